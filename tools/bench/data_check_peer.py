#!/usr/bin/env python3
"""Peer for the data-check benchmark: the same work as `tabletrace data check`
on Spider questions, in Python's sqlite3 (one read-only connection per
database file, a progress-handler time limit, rows fetched into memory).

    python3 tools/bench/data_check_peer.py QUESTIONS.json DB_DIR
Prints one JSON line: {"questions", "sql_ok", "sql_error", "seconds"}.
"""
import json
import os
import sqlite3
import sys
import time


def main():
    questions_path, db_dir = sys.argv[1], sys.argv[2]
    questions = json.load(open(questions_path))
    start = time.perf_counter()
    conns = {}
    ok = err = 0
    for q in questions:
        path = os.path.join(db_dir, q["db_id"], q["db_id"] + ".sqlite")
        if not os.path.isfile(path):
            continue
        conn = conns.get(path)
        if conn is None:
            conn = conns[path] = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        deadline = time.monotonic() + 10.0
        conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 1000)
        try:
            rows = conn.execute(q["query"]).fetchmany(10_000)
            ok += 1
        except sqlite3.Error:
            err += 1
    seconds = time.perf_counter() - start
    print(json.dumps({"questions": len(questions), "sql_ok": ok, "sql_error": err, "seconds": seconds}))


if __name__ == "__main__":
    main()
