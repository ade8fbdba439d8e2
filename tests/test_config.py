"""Schedule values whose unit cannot be confused: ints are step counts; fractions of the steps are
"30%", a Fraction or a float strictly between 0 and 1; a whole-number float is an error."""

from fractions import Fraction

import pytest
import yaml

from rettn.core.config import SCHEDULE_FIELDS, RettnConfig, load_preset, parse_steps, preset_names
from rettn.errors import ConfigError


@pytest.mark.parametrize("value, parsed", [
    (0, 0), (1, 1), (15, 15), ("5", 5),
    ("30%", 0.3), (" 30 %", 0.3), ("12.5%", 0.125), ("100%", 1.0), ("0%", 0.0),
    (Fraction(3, 10), 0.3), (Fraction(1), 1.0),
    (0.3, 0.3), ("0.3", 0.3), (0.0, 0.0),
])
def test_parse_steps_reads_counts_and_fractions(value, parsed):
    out = parse_steps(value, "warmup")
    assert out == parsed and type(out) is type(parsed)


def test_fractions_resolve_as_the_floats_did():
    for pct in range(0, 100):  # "N%" is exactly the float N / 100, so it rounds to the same steps
        assert RettnConfig(warmup=f"{pct}%").warmup == pct / 100
        assert RettnConfig(refresh_interval=f"{pct + 1}%").refresh_interval == (pct + 1) / 100
    for steps in (7, 20, 30, 50, 51, 100):
        assert RettnConfig(warmup="30%", refresh_interval="10%").schedule(steps) == \
            RettnConfig(warmup=0.3, refresh_interval=0.1).schedule(steps) == \
            RettnConfig(warmup=Fraction(3, 10), refresh_interval=Fraction(1, 10)).schedule(steps)
    assert RettnConfig(warmup="30%").schedule(50).warmup == 15
    assert RettnConfig(warmup="100%").schedule(20).kinds(20) == ["dense"] * 20
    assert RettnConfig(warmup=1).schedule(20).kinds(20)[:2] == ["dense", "cache"]


@pytest.mark.parametrize("field", sorted(SCHEDULE_FIELDS))
def test_whole_number_float_is_ambiguous(field):
    with pytest.raises(ConfigError, match=rf"{field}=1.0 is ambiguous \(one step, or every step\?\): "
                                          rf"write {field}=1 for one step, or {field}='100%' for every step"):
        RettnConfig(**{field: 1.0})
    with pytest.raises(ValueError, match=rf"{field}=2.0 is ambiguous .*write {field}=2 for 2 steps"):
        RettnConfig(**{field: 2.0})
    with pytest.raises(ConfigError, match="is ambiguous"):
        parse_steps("1.0", field)


@pytest.mark.parametrize("field", sorted(SCHEDULE_FIELDS))
@pytest.mark.parametrize("value", [True, False, None, -1, 1.5, "120%", "-5%", "lots", float("nan"), [1]])
def test_bad_schedule_values(field, value):
    with pytest.raises(ConfigError, match=rf"{field} must be a step count \(int >= [01]\) or a fraction of the steps"):
        RettnConfig(**{field: value})


def test_refresh_interval_needs_a_positive_value():
    for value in (0, 0.0, "0%", Fraction(0)):
        with pytest.raises(ConfigError, match=r"refresh_interval must be a step count \(int >= 1\)"):
            RettnConfig(refresh_interval=value)
    assert RettnConfig(refresh_interval="100%").refresh_interval == 1.0


def test_strings_pass_through_construction_presets_and_replace():
    c = RettnConfig(warmup="30%", refresh_interval="10%", dense_final="10%")
    assert (c.warmup, c.refresh_interval, c.dense_final) == (0.3, 0.1, 0.1)
    p = RettnConfig.from_preset("cogvideox-2b", warmup="20%")
    assert p.warmup == 0.2 and p.schedule(50).warmup == 10
    assert RettnConfig.from_dict({"warmup": "30%"}).warmup == 0.3
    r = c.replace(warmup="50%")
    assert r.warmup == 0.5 and r.refresh_interval == 0.1
    every = RettnConfig(warmup="100%", dense_final="100%", refresh_interval="100%")
    again = every.replace(keep=0.5)  # kept fractions of 1.0 are not re-read as an ambiguous float
    assert (again.warmup, again.dense_final, again.refresh_interval, again.keep) == (1.0, 1.0, 1.0, 0.5)
    with pytest.raises(ConfigError, match="is ambiguous"):
        c.replace(warmup=1.0)
    assert RettnConfig(warmup=3).replace(keep=0.5).warmup == 3


def test_yaml_spellings():
    for text in ("warmup: 30%", "warmup: '30%'", "warmup: 0.3"):
        assert RettnConfig.from_dict(yaml.safe_load(text)).warmup == 0.3
    assert RettnConfig.from_dict(yaml.safe_load("warmup: 3")).warmup == 3
    with pytest.raises(ConfigError, match="is ambiguous"):
        RettnConfig.from_dict(yaml.safe_load("warmup: 1.0"))


def test_presets_use_unambiguous_schedule_values():
    for name in preset_names():
        values = load_preset(name)["config"]
        for field in SCHEDULE_FIELDS:
            if field in values:
                v = values[field]
                assert not (isinstance(v, float) and v.is_integer() and v >= 1), (name, field, v)
                parse_steps(v, field)
