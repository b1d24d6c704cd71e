"""spamtest / virustest (RFC 5235) from what the content filters left in the queue meta.

meta["spam"] = {"score", "threshold", "is_spam"} (rspamd/spamd stages); meta["virus"] = name.
"""
from __future__ import annotations


def spamtest_value(meta: dict, percent: bool) -> str:
    spam = meta.get("spam")
    if not isinstance(spam, dict):
        return "0"  # not tested
    try:
        score, threshold = float(spam.get("score", 0)), float(spam.get("threshold", 0))
    except (TypeError, ValueError):
        return "0"
    if threshold <= 0:
        threshold = 1.0
    ratio = max(0.0, min(1.0, score / threshold))
    if percent:
        return str(int(round(ratio * 100)))
    if spam.get("is_spam") or score >= threshold:
        return "10"
    # 1 = definitely not spam ... 9 = nearly at the threshold
    return str(1 + int(ratio * 8))


def virustest_value(meta: dict) -> str:
    if "virus" in meta and meta["virus"]:
        return "5"  # definitely infected
    if meta.get("virus_scanned") or "spam" in meta or "virus" in meta:
        return "1"  # scanned, nothing found
    return "0"  # not tested
