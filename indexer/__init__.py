"""influence-index: EK-FAC-preconditioned gradient-sketch indexes of an LM's training corpus.

The library's entry points, importable from `indexer` itself:
- `build_index(BuildConfig) -> BuildSummary`: build and publish a version (`indexer.build`);
- `QueryEngine.open(root)`, then `.query([Query(prompt, completion)])`: answer from a
  published version (`indexer.engine`, `indexer.query`);
- `ExactScorer(loaded, examples, ExactConfig())`: exact EK-FAC influence over a whole corpus,
  the reference (`indexer.exact`);
- the configuration dataclasses (`indexer.config`).
`evaluate(EvalConfig) -> EvalReport` (fidelity and fact tracing) is imported from
`indexer.evaluate`: the name is its module's, which an import of the module would put here.

They are imported on first use: most import torch, which `import indexer` (e.g. for
`__version__`) does not.
"""

from importlib import import_module

__version__ = "0.1.0"

_ENTRY_POINTS = {
    "build_index": "indexer.build",
    "BuildSummary": "indexer.build",
    "QueryEngine": "indexer.engine",
    "EngineOptions": "indexer.engine",
    "Query": "indexer.query",
    "ExactScorer": "indexer.exact",
    "ExactConfig": "indexer.exact",
    "BuildConfig": "indexer.config",
    "CorpusConfig": "indexer.config",
    "SketchConfig": "indexer.config",
    "CurvatureConfig": "indexer.config",
    "StoreConfig": "indexer.config",
    "IncrementalConfig": "indexer.config",
    "ScoreKind": "indexer.config",
}

__all__ = ["__version__", *_ENTRY_POINTS]


def __getattr__(name: str) -> object:
    """An entry point, from its module (imported now, on first use)."""
    if name not in _ENTRY_POINTS:
        raise AttributeError(f"module 'indexer' has no attribute {name!r}")
    return getattr(import_module(_ENTRY_POINTS[name]), name)
