"""The action grammar: what parses, what does not, and that parsing never raises."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from envs.actions import (
    Answer,
    Click,
    Key,
    Scroll,
    TypeText,
    Wait,
    format_action,
    from_pixel,
    parse_action,
    to_pixel,
)


@pytest.mark.parametrize(
    "text, action",
    [
        ("click(12, 999)", Click(12, 999)),
        ("  click ( 0 ,1000 )\n", Click(0, 1000)),
        ('click("Save", 264, 802)', Click(264, 802, "Save")),
        ('click ( "a, \\"b\\"" ,0, 1000 )', Click(0, 1000, 'a, "b"')),
        ('type("hello, \\"world\\"")', TypeText('hello, "world"')),
        ('type("two\nlines")', TypeText("two\nlines")),
        ("scroll(-3, 5)", Scroll(-3, 5)),
        ('key("ctrl+a")', Key("ctrl+a")),
        ("wait()", Wait()),
        ("wait( )", Wait()),
        ('answer("Ωmega 42")', Answer("Ωmega 42")),
        ('answer("")', Answer("")),
    ],
)
def test_parses_the_grammar(text, action):
    assert parse_action(text) == action


@pytest.mark.parametrize(
    "text",
    [
        "", "wait", "wait(1)", "click(1001, 5)", "click(-1, 5)", "click(1.5, 2)", "click(1, 2, 3)",
        "click(١, ٢)",  # non-ASCII digits
        "click(" + "9" * 5000 + ", 1)",  # longer than int() accepts
        "type(hello)", "type('hello')", 'type("unterminated)', 'type("a" "b")', 'type("\\x41")',
        'click("", 1, 2)', 'click("Save", 1001, 2)', "click(Save, 1, 2)", 'click("Save", 1)', 'click(1, 2, "Save")',
        'key("")', "scroll(1001, 0)", "scroll(0, -1001)", 'type("\\ud800")', "Click(1, 2)", "click(1, 2) wait()", 'answer("a"))', "scroll(1)", None, 42,
    ],
)
def test_malformed_text_gives_none(text):
    assert parse_action(text) is None


actions = st.one_of(
    st.builds(Click, st.integers(0, 1000), st.integers(0, 1000), st.text()),
    st.builds(TypeText, st.text()),
    st.builds(Scroll, st.integers(-1000, 1000), st.integers(-1000, 1000)),
    st.builds(Key, st.text(min_size=1)),
    st.just(Wait()),
    st.builds(Answer, st.text()),
)


@given(actions)
def test_format_then_parse_is_identity(action):
    assert parse_action(format_action(action)) == action


@given(st.text())
def test_parsing_never_raises(text):
    parse_action(text)


@given(st.from_regex(r"\s*(click|type|scroll|key|wait|answer)\s*\(.*\)\s*"))
def test_parsing_grammar_shaped_text_never_raises(text):
    parse_action(text)


@pytest.mark.parametrize("size", [1, 7, 160, 210, 336, 501, 999, 1000])
def test_pixel_coordinates_round_trip(size):
    assert all(to_pixel(from_pixel(p, size), size) == p for p in range(size))
    assert to_pixel(0, size) == 0 and to_pixel(1000, size) == size - 1
