"""Layers point down and there are no import cycles (docs/STYLE.md, "What the codebase taught us", item 2).

The graph is read with ``ast`` from every module of ``vlad/`` and ``webui/``: module-level and function-level
imports alike (a function-level import that closes a cycle is still a cycle), relative imports and
``importlib.import_module("literal")``. See tests/helpers/import_graph.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.import_graph import ImportGraph, Layers, describe_cycle

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["vlad", "webui"]

# The one layer table. Lowest first; a module may import only from its own layer or below. A module takes the layer
# of its most specific pattern (an exact name beats a wildcard, a longer wildcard a shorter one). Beyond STYLE.md's
# list:
# - foundation: the small leaf helpers next to errors/result: _argtypes (argparse value checks, no argparse use of
#   their own), _optional (require()), _version, resources (bundled prompt/adapter files).
# - grounding (zero-shot object detectors) sits with the backbones, not with rules/explain as STYLE.md lists it: it
#   is a model wrapper like the backbones (loads weights, needs only errors/regions/data), and the FiLo scorer uses
#   a detector to find the object, so it must be below the scorers.
# - checkpoints (importing official Crane/AnomalyCLIP releases as adapters) and prompt_learner (the trainable text
#   prompts, shared by adapters and training) go with scorers/adapters/training, and so does training_lvlm (LoRA on
#   the explainer's language model; explain.backends reads its adapter check).
# - export (tracing a built scorer to ONNX) goes with the scorers: it needs a scorer and an adapter, nothing above;
#   the onnxruntime side is vlad.scorers.onnx_runtime (reached through vlad.scorers.get_scorer).
# - the ``vlad`` package itself is the public facade (vlad.Detector, vlad.get_scorer): the pipeline layer. Library
#   modules take ``__version__`` from vlad._version, never from ``vlad``.
# - reportlog (a run's report.jsonl and files, resumable, local or fsspec) and distributed (the Ray engine) sit with
#   the pipeline they drive: every engine calls Detector.iter_inspect and writes rows through reportlog.
# - the command-line modules and the web UI are the top layer; ``vlad.cli.common`` holds what they share.
LAYERS = Layers(
    [
        (
            "foundation",
            [
                "vlad.errors",
                "vlad.result",
                "vlad.thresholds",
                "vlad.regions",
                "vlad.viz",
                "vlad._argtypes",
                "vlad._optional",
                "vlad._version",
                "vlad.resources",
            ],
        ),
        ("data/metrics", ["vlad.data", "vlad.data.*", "vlad.metrics", "vlad.metrics.*", "vlad.finegrained"]),
        ("backbones/concepts/grounding", ["vlad.backbones*", "vlad.laft", "vlad.grounding*"]),
        (
            "scorers/adapters/training",
            [
                "vlad.scorers*",
                "vlad.adapters",
                "vlad.prompt_learner",
                "vlad.checkpoints",
                "vlad.training",
                "vlad.export",
                "vlad.training_lvlm",
            ],
        ),
        ("rules/lvlm/explain", ["vlad.rules*", "vlad.explain*"]),
        ("pipeline/api", ["vlad", "vlad.api", "vlad.pipeline", "vlad.reportlog", "vlad.distributed"]),
        ("cli/webui", ["vlad.cli", "vlad.cli.*", "webui*"]),
    ]
)


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return ImportGraph.scan(ROOT, PACKAGES)


def test_every_module_has_a_layer(graph):
    assert len(graph.modules) > 40  # the scan found the project
    assert LAYERS.unplaced(graph.modules) == [], "add these modules to LAYERS in tests/unit/test_layers.py"


def test_no_import_cycles(graph):
    cycles = graph.cycles()
    tangles = "\n".join("  " + ", ".join(t) for t in graph.tangles())
    assert not cycles, "import cycles:\n" + "\n".join(describe_cycle(c) for c in cycles) + "\nin:\n" + tangles


def test_imports_point_down(graph):
    bad = graph.upward_imports(LAYERS)
    assert not bad, "imports from a higher layer:\n" + "\n".join(f"{imp}  [{low} -> {high}]" for imp, low, high in bad)


def test_layer_table_places_the_cli_on_top():
    top = len(LAYERS.names) - 1
    for module in ["vlad.cli", "vlad.cli.detect", "vlad.cli.adapters", "vlad.cli.rules", "vlad.cli.chat", "webui"]:
        assert LAYERS.index(module) == top, module
    assert LAYERS.index("vlad.rules.apply") == LAYERS.index("vlad.explain.backends") < top
    assert LAYERS.index("vlad.errors") == 0


# ---------------------------------------------------------------------- the checker itself, on a made-up package
def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


TOY_LAYERS = Layers([("low", ["toy.low*"]), ("high", ["toy", "toy.high"])])


def test_checker_reports_a_cycle_through_a_function_level_import(tmp_path):
    _write(
        tmp_path,
        {
            "toy/__init__.py": "",
            "toy/low/__init__.py": "",
            "toy/low/a.py": "from toy.low import b\n",
            "toy/low/b.py": "def f():\n    from . import c\n",
            "toy/low/c.py": "import importlib\nimportlib.import_module('toy.low.a')\n",
            "toy/low/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from toy.low.a import x\n",
            "toy/low/e.py": "from toy.low.d import y\n",
        },
    )
    graph = ImportGraph.scan(tmp_path, ["toy"])
    cycles = graph.cycles()
    assert len(cycles) == 1
    text = describe_cycle(cycles[0])
    assert text.splitlines()[0] == "toy.low.a -> toy.low.b -> toy.low.c -> toy.low.a"
    assert "toy.low.b:2 imports toy.low.c (in a function)" in text
    assert graph.upward_imports(TOY_LAYERS) == []


def test_checker_reports_an_upward_import(tmp_path):
    _write(
        tmp_path,
        {
            "toy/__init__.py": "",
            "toy/high.py": "from toy.low.util import helper\n",
            "toy/low/__init__.py": "",
            "toy/low/util.py": "def helper():\n    from ..high import thing\n",
            "toy/low/other.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import toy.high\n",
        },
    )
    graph = ImportGraph.scan(tmp_path, ["toy"])
    bad = sorted((str(imp), low, high) for imp, low, high in graph.upward_imports(TOY_LAYERS))
    assert bad == [
        ("toy.low.other:3 imports toy.high (type-checking only)", "low", "high"),
        ("toy.low.util:2 imports toy.high (in a function)", "low", "high"),
    ]
    assert [describe_cycle(c).splitlines()[0] for c in graph.cycles()] == ["toy.high -> toy.low.util -> toy.high"]
    assert LAYERS.unplaced(["vlad.brand_new"]) == ["vlad.brand_new"]  # a new module must be placed on purpose
