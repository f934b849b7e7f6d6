"""The demo's index: built from the demo model and corpus, reused while both are unchanged."""

from __future__ import annotations

from pathlib import Path

from indexer.build import build_index
from indexer.config import BuildConfig, CorpusConfig
from indexer.demo.train import DemoArtifacts
from indexer.errors import IndexVerificationError
from indexer.incremental import built_with
from indexer.model import weights_sha256
from indexer.publish import read_current, read_manifest, version_dir


def ensure_demo_index(artifacts: DemoArtifacts, root: Path, rebuild: bool, progress: bool) -> str:
    """The published demo version's id; builds one unless CURRENT's was built from these
    weights and this corpus with today's default settings (or `rebuild`)."""
    config = BuildConfig(
        model=artifacts.model_dir,
        out=root,
        corpus=CorpusConfig(str(artifacts.corpus_path)),
        progress=progress,
    )
    if read_current(root) and not rebuild:
        path = version_dir(root)
        try:
            manifest = read_manifest(path)
        except IndexVerificationError:  # e.g. built by an older format: build anew
            manifest = None
        same_model = manifest and manifest.model.weights_sha256 == weights_sha256(
            artifacts.model_dir
        )
        same_corpus = same_model and manifest.corpus.data == str(artifacts.corpus_path)
        if same_corpus and built_with(manifest, config):
            return path.name
    return build_index(config).version
