"""Regenerate the generated parts of the docs from the config schema:
the bundled config.toml and the README's configuration reference.

    python tests/update_docs.py        (tests/test_config.py checks they are current)
"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mailstack import config  # noqa: E402


def main() -> None:
    (ROOT / "config.toml").write_text(config.sample())
    readme = ROOT / "README.md"
    text = readme.read_text()
    text = re.sub(r"(<!-- config-reference:start -->\n).*?(<!-- config-reference:end -->)",
                  lambda m: m.group(1) + config.reference_markdown() + m.group(2), text, flags=re.S)
    readme.write_text(text)


if __name__ == "__main__":
    main()
