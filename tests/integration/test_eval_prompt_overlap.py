"""`vlad eval` warns when the scorer's prompt phrases repeat the evaluated dataset's defect names (test labels)."""

from __future__ import annotations

import json

from vlad.cli import main


def test_eval_warns_about_prompts_sharing_defect_names(tmp_path, capsys):
    from vlad.data.synthetic import make_synthetic_dataset

    root = tmp_path / "mvtec"
    make_synthetic_dataset(root, "tex", n_train=2, n_good=2, n_bad=2, size=64, kind="stripes", seed=3)
    for folder in ("test", "ground_truth"):  # a defect folder named like WinCLIP's state "{} with flaw"
        (root / "tex" / folder / "synthetic").rename(root / "tex" / folder / "with_flaw")
    out = tmp_path / "m.json"
    code = main(
        [
            "eval",
            "--root",
            str(root),
            "--layout",
            "mvtec",
            "--scorer",
            "winclip",
            "--backbone",
            "random:tiny",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    message = "prompts share phrases with tex's defect names: with flaw"
    assert f"warning: {message}" in capsys.readouterr().out
    assert message in json.loads(out.read_text())["warnings"]
