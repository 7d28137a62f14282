"""`python -m qwen3_vl options` lists every registered option with what it declares."""

from __future__ import annotations

from qwen3_vl.__main__ import main
from qwen3_vl.optim import all_options


def test_every_option_is_listed(capsys):
    assert main(["options", "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    body = lines[2:]
    assert len(body) == len(all_options())
    for opt in all_options():
        row = next(r for r in body if r.startswith(f"| {opt.axis} | {opt.name}"))
        cells = [c.strip() for c in row.split(" | ")]
        assert (cells[2] == "exact") == opt.exact
        assert cells[4] == (opt.fallback or "-")
