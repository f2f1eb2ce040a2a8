"""Small synthetic chat and preference sets with a learnable format, for trying SFT and DPO on a laptop and in tests:
SFT answers any request with `ANSWER: <the request's last word>`; DPO prefers the answer in capitals."""

from __future__ import annotations

import json
import os
import random
from typing import Any

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def toy_word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def sft_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i in range(n):
        w = toy_word(rng)
        if i % 2:
            out.append({"prompt": f"say {w}", "response": f"ANSWER: {w}"})
        else:
            out.append(
                {
                    "messages": [
                        {"role": "system", "content": "be brief"},
                        {"role": "user", "content": f"word {w}"},
                        {"role": "assistant", "content": f"ANSWER: {w}"},
                    ]
                }
            )
    return out


def preference_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt": f"say {w}", "chosen": f"ANSWER: {w.upper()}", "rejected": f"ANSWER: {w}"}
        for w in (toy_word(rng) for _ in range(n))
    ]


def write_jsonl(path: str, records: list[dict]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    os.replace(path + ".tmp", path)
    return path


def write_toy_sets(out: str, n: int = 400, seed: int = 0) -> tuple[str, str]:
    return (
        write_jsonl(os.path.join(out, "sft.jsonl"), sft_records(n, seed)),
        write_jsonl(os.path.join(out, "prefs.jsonl"), preference_records(n, seed + 1)),
    )
