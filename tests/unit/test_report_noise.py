"""`report`'s noise, field and flip sections, read from /shadow/stats documents."""

from __future__ import annotations

import pytest

from shadowproxy.commands.report_noise import FIELDS_SHOWN, field_lines, flip_lines, flip_shares, noise_lines


def plain(text: str, *styles: str) -> str:
    return text


def test_flip_shares_count_the_candidates_label_off_the_diagonal() -> None:
    confusion = {"labels": ["0", "1", "2"], "matrix": [[50, 10, 0], [5, 40, 15], [0, 0, 30]]}
    flips, shares = flip_shares(confusion)
    assert flips == 30
    assert shares == pytest.approx({"0": 5 / 30, "1": 10 / 30, "2": 15 / 30})
    line = flip_lines({"confusion": confusion})[0]
    assert "2 50%" in line and "1 33.3%" in line and "0 16.7%" in line and "of 30" in line


def test_no_flips_no_line() -> None:
    assert flip_lines({"confusion": {"labels": ["a"], "matrix": [[3]]}}) == []
    assert flip_lines({}) == []


def test_fields_are_ranked_by_net_rate_and_noisy_ones_named() -> None:
    fields = {
        "/created": {"compared": 100, "differ": 100, "noise_compared": 100, "noise_differ": 100, "noisy": True},
        "/label": {"compared": 100, "differ": 30, "noise_compared": 100, "noise_differ": 5, "noisy": True},
        "/score": {"compared": 100, "differ": 20, "noise_compared": 100, "noise_differ": 0, "noisy": False},
        **{f"/f{i:02}": {"compared": 100, "differ": 0, "noise_compared": 0, "noise_differ": 0, "noisy": False}
           for i in range(20)},
    }
    lines = field_lines({"fields": fields, "fields_overflow": 3}, plain)
    assert lines[0] == f"Fields by net difference rate (top {FIELDS_SHOWN} of 23)"
    assert lines[1].lstrip().startswith("/label") and "net 25%" in lines[1]  # 30% raw - 5% noise
    assert lines[2].lstrip().startswith("/score") and "net 20%" in lines[2]
    assert "  noisy, left out of agreement: /created (100% noise), /label (5% noise)" in lines
    assert lines[-1].startswith("  3 leaves")


def test_noise_lines_state_noise_raw_and_net() -> None:
    comparisons = {
        "noise": {"rate": 0.32, "ci95": [0.30, 0.34], "compared": 2000, "missing": 4},
        "net": {"rate": 0.14, "ci95": [0.11, 0.17], "raw_rate": 0.46},
    }
    lines = noise_lines({"comparisons": comparisons}, plain)
    assert "noise 32%" in lines[1] and "2000 predictions, 4 left out" in lines[1]
    assert "net disagreement 14%" in lines[2] and "raw 46% less noise 32%" in lines[2]
    assert noise_lines({"comparisons": {}}, plain) == []


def test_with_several_candidates_the_flip_line_names_the_candidate() -> None:
    confusion = {"labels": ["a", "b"], "matrix": [[1, 2], [0, 1]]}
    assert flip_lines({"confusion": confusion}, "retrained")[0].startswith("Flips toward each class of retrained (")
