"""Where the project lives: the repository root that holds bench/ and impls/."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
