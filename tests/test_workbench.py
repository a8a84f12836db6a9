"""saelab.workbench's latent descriptions (notes, explanations, index labels), markdown
escaping and the Steer page's helpers, on hand-written files; and viz's token highlighting."""

import json
import re

import pytest

from saelab import viz
from saelab import workbench as wb
from saelab.errors import UserError
from saelab.runs import EXPLANATIONS, NOTES


def _line(latent, text, score=0.8, **extra):
    return json.dumps({"latent": latent, "explanation": text, "score": score, "n_scored": 40,
                       "explainer": "tiny", **extra})  # fmt: skip


def test_explanations_later_lines_win_and_a_torn_last_line_is_ignored(tmp_path):
    assert wb.read_explanations(tmp_path) == {}
    (tmp_path / EXPLANATIONS).write_text(
        "\n".join([_line(3, "old"), _line(5, "verbs", None), _line(3, "the word 'the'")])
        + '\n{"latent": 9, "expla'
    )
    got = wb.read_explanations(tmp_path)
    assert sorted(got) == [3, 5]
    assert got[3].explanation == "the word 'the'" and got[3].score == 0.8
    assert got[3].n_scored == 40 and got[3].explainer == "tiny"
    assert got[5].score is None


def test_a_bad_line_before_the_last_is_an_error(tmp_path):
    (tmp_path / EXPLANATIONS).write_text(_line(1, "a") + "\nnot json\n" + _line(2, "b") + "\n")
    with pytest.raises(UserError, match="line 2 of .* is not an explanation record") as e:
        wb.read_explanations(tmp_path)
    assert "\n" not in str(e.value)


def test_notes_round_trip_keep_others_and_remove_on_blank(tmp_path):
    assert wb.read_notes(tmp_path) == {}
    wb.write_note(tmp_path, 4, "  commas  ")
    wb.write_note(tmp_path, 11, "fires on __init__")
    assert json.loads((tmp_path / NOTES).read_text()) == {"4": "commas", "11": "fires on __init__"}
    assert wb.write_note(tmp_path, 4, " ") == {11: "fires on __init__"}
    assert wb.read_notes(tmp_path) == {11: "fires on __init__"}
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temp file, which is gone
    (tmp_path / NOTES).write_text('{"x": "y"}')
    with pytest.raises(UserError, match="not a latent id"):
        wb.read_notes(tmp_path)


def test_describer_prefers_note_then_explanation_then_index(tmp_path):
    (tmp_path / EXPLANATIONS).write_text(_line(1, "Bible verses", 0.75) + "\n" + _line(2, "x"))
    wb.write_note(tmp_path, 2, "my own words")
    d = wb.describer(tmp_path, None)
    assert d(2) == "my own words" and d.source(2) == "note"
    assert d(1) == "Bible verses (score 0.75)" and d.source(1) == "explanation"
    assert d(3) == "" and d.source(3) == "none"

    class Index:
        def latent(self, i):
            return type("Card", (), {"label": lambda self: f"fires on '{i}'"})()

    d = wb.describer(tmp_path, Index())
    assert d(3) == "fires on '3'" and d.source(3) == "index" and d(2) == "my own words"


def test_md_escape_neutralises_markdown():
    for raw in ("def __init__(self):", "[link](http://x.y)", "**bold** `code` $x$", ":red[hi]"):
        out = wb.md_escape(raw)
        plain = re.sub(r"\\(.)", r"\1", out).replace("\u2060", "")
        assert plain == raw  # unescaping gives the text back
        assert not re.search(r"(?<!\\)[_*\[\]`$:]", out)  # no active markdown character
    for url in ("see http://x.y", "www.python.org", "me@x.org"):  # no bare autolinks either
        assert not re.search(r"://\w|www\\?\.|@\w", wb.md_escape(url)), wb.md_escape(url)
    assert wb.md_escape("a\nb") == "a↵b" and wb.md_escape("a\nb", one_line=False) == "a\nb"


def test_parse_latents():
    assert wb.parse_latents(" 12, 40 7,12 ", 50) == [12, 40, 7]
    assert wb.parse_latents("", 50) == []
    with pytest.raises(UserError, match="'x' is not a latent id"):
        wb.parse_latents("3, x", 50)
    with pytest.raises(UserError, match="out of range"):
        wb.parse_latents("50", 50)


def test_prob_shifts_rank_by_absolute_change():
    before = {"a": 0.5, "b": 0.3, "c": 0.2}
    after = {"a": 0.1, "b": 0.35, "d": 0.55}
    rows = wb.prob_shifts(before, after, 3)
    assert [r["token"] for r in rows] == ["d", "a", "c"]
    assert rows[0]["change"] == pytest.approx(0.55) and rows[1]["change"] == pytest.approx(-0.4)
    assert rows[2] == {"token": "c", "before": 0.2, "after": 0.0, "change": -0.2}


def test_lens_caveat_names_the_layer():
    assert "layer 6" in wb.lens_caveat("blocks.6.hook_resid_post")
    assert "hook_embed" in wb.lens_caveat("hook_embed")


def test_token_html_minimum_opacity_and_css_tooltip():
    assert viz.token_alpha(0.0, 10.0) == 0.0 and viz.token_alpha(-1.0, 10.0) == 0.0
    assert viz.token_alpha(0.01, 10.0) == viz.MIN_ALPHA and viz.token_alpha(5.0, 10.0) == 0.5
    assert viz.token_alpha(20.0, 10.0) == 1.0
    out = viz.token_html(["Rot", "ating", "__"], [0.0, 0.05, 10.0], peak=2, vmax=10.0)
    alphas = [float(a) for a in re.findall(r"rgba\(228,87,86,([\d.]+)\)", out)]
    assert alphas == [0.0, viz.MIN_ALPHA, 1.0]
    assert re.findall(r'data-v="([^"]+)"', out) == ["0", "0.05", "10"]
    assert "title=" not in out and "padding" not in out.split("</style>")[1]
    assert out.count("sl-peak") == 2 and 'class="sl-t sl-peak"' in out  # CSS rule, the peak
