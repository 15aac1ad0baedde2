import pytest
from hypothesis import given, strategies as st

from plansim.simulator.units import UnitError, format_bytes, parse_quantity


@pytest.mark.parametrize("text,kind,expected", [
    ("3.35 TB/s", "bytes_per_s", 3.35e12),
    ("200 Gb/s", "bytes_per_s", 25e9),          # bits -> bytes
    ("400 Gbps", "bytes_per_s", 50e9),
    ("80 GiB", "bytes", 80 * 2**30),
    ("81559 MiB", "bytes", 81559 * 2**20),
    ("180 GB", "bytes", 180e9),
    ("989.4 TFLOP/s", "flops", 989.4e12),
    ("2.25 PFLOP/s", "flops", 2.25e15),
    ("0.6 us", "seconds", 0.6e-6),
    ("250 ns", "seconds", 250e-9),
    ("4.5 µs", "seconds", 4.5e-6),
    (1.5e9, "bytes_per_s", 1.5e9),               # bare numbers are SI
    ("7", "bytes", 7.0),
])
def test_parse(text, kind, expected):
    assert parse_quantity(text, kind) == pytest.approx(expected)


@pytest.mark.parametrize("text,kind", [
    ("3 GHz", "bytes_per_s"), ("80 GiB", "seconds"), ("fast", "bytes"), ("1 TFLOP/s", "bytes"),
    (True, "bytes"), ("3 XB", "bytes"),
])
def test_reject(text, kind):
    with pytest.raises(UnitError):
        parse_quantity(text, kind)


@given(st.floats(min_value=1e-3, max_value=1e6, allow_nan=False))
def test_bits_are_an_eighth_of_bytes(x):
    assert parse_quantity(f"{x!r} Gb/s", "bytes_per_s") == pytest.approx(parse_quantity(f"{x!r} GB/s", "bytes_per_s") / 8)


def test_format_bytes():
    assert format_bytes(80 * 2**30) == "80.00 GiB"
    assert format_bytes(12) == "12 B"
