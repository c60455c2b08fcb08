"""Tokenizer evaluation: bytes per token on the validation text and on a few fixed kinds of text.

Higher bytes/token = better compression. Our tokenizer is compared with the GPT-2 and GPT-4
(cl100k) encodings when tiktoken can load them; tiktoken fetches those files over the network
the first time, so offline the comparison says so and covers what is available.
The fixed texts below were written for this project (news, code, math, non-English).
"""

from __future__ import annotations

import socket
from collections.abc import Callable

SAMPLE_TEXTS = {
    "news": (
        "The city council voted 7-2 on Tuesday to extend the night bus service through the winter, "
        "after a pilot that carried 41,300 riders between October and December. Officials said the "
        "extension would cost about $2.4 million and be paid from the transit reserve fund."
    ),
    "code": (
        "def moving_average(values: list[float], window: int) -> list[float]:\n"
        "    if window <= 0:\n"
        "        raise ValueError(f\"window must be positive, got {window}\")\n"
        "    out, total = [], 0.0\n"
        "    for i, v in enumerate(values):\n"
        "        total += v\n"
        "        if i >= window:\n"
        "            total -= values[i - window]\n"
        "        out.append(total / min(i + 1, window))\n"
        "    return out\n"
    ),
    "math": (
        "Let f(x) = 3x^2 - 12x + 7. Then f'(x) = 6x - 12, which is zero at x = 2, and f(2) = -5. "
        "Since f''(x) = 6 > 0, the minimum value is -5. The integral of f from 0 to 3 is 27 - 54 + 21 = -6."
    ),
    "german": (
        "Der Zug nach Hamburg hatte wegen eines Stellwerksfehlers fast eine Stunde Verspätung, "
        "doch die meisten Fahrgäste blieben gelassen und tranken Kaffee im Speisewagen."
    ),
    "japanese": "東京の朝は早い。駅のホームには通勤客が並び、電車は数分おきに到着する。",
    "emoji": "Launch day! 🚀 Tests green ✅, coffee ☕ x3, bugs 🐛 = 0 (for now) 🎉",
}

REFERENCE_ENCODINGS = {"gpt2": "gpt2", "gpt4": "cl100k_base"}
_TIKTOKEN_HOST = "openaipublic.blob.core.windows.net"


def bytes_per_token(encode: Callable[[str], list[int]], text: str) -> float:
    n = len(encode(text))
    return len(text.encode("utf-8")) / max(n, 1)


def load_reference_encodings() -> tuple[dict[str, Callable[[str], list[int]]], str]:
    """The GPT-2/GPT-4 encoders tiktoken can load here, and a note on what was not available.

    A DNS lookup decides whether tiktoken could fetch its files; offline nothing more is tried.
    """
    import tiktoken

    encoders: dict[str, Callable[[str], list[int]]] = {}
    missing = []
    try:
        socket.getaddrinfo(_TIKTOKEN_HOST, 443)
        online = True
    except OSError:
        online = False
    for label, name in REFERENCE_ENCODINGS.items():
        try:
            if not online:
                raise OSError(f"offline ({_TIKTOKEN_HOST} does not resolve)")
            enc = tiktoken.get_encoding(name)
            encoders[label] = enc.encode_ordinary
        except Exception as e:  # any failure to load means "not available here"
            missing.append(f"{label} ({name}): {e}")
    note = "all reference encodings loaded" if not missing else "not available: " + "; ".join(missing)
    return encoders, note


def compression_report(encoders: dict[str, Callable[[str], list[int]]],
                       texts: dict[str, str]) -> dict[str, dict]:
    """{text name: {encoder name: bytes/token, ...}, ...} plus each encoder's ratio to "ours"."""
    report: dict[str, dict] = {}
    for tname, text in texts.items():
        row = {ename: round(bytes_per_token(enc, text), 4) for ename, enc in encoders.items()}
        if "ours" in row:
            for ename in list(row):
                if ename != "ours":
                    row[f"ours_vs_{ename}"] = round(row["ours"] / row[ename], 4)
        report[tname] = row
    return report


def format_report(report: dict[str, dict]) -> str:
    """A small Markdown table of a compression report."""
    cols = sorted({c for row in report.values() for c in row}, key=lambda c: (c != "ours", c))
    lines = ["| text | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for tname, row in report.items():
        lines.append(f"| {tname} | " + " | ".join(str(row.get(c, "-")) for c in cols) + " |")
    return "\n".join(lines)
