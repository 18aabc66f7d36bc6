#!/usr/bin/env python3
"""Builds data/sample/ from ../shared/data: a few small Spider databases with
the MMQA and Spider questions asked over them, so that a fresh clone runs the
tests and the demo without ../shared. Deterministic; run from the repo root:

    python3 tools/make_sample.py [--shared ../shared/data]
"""
import argparse
import json
import os
import shutil

DATABASES = ["department_management", "farm", "movie_1", "club_1", "icfp_1", "dorm_1", "pets_1", "activity_1"]
SPIDER_PER_DB = 25


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default="../shared/data")
    ap.add_argument("--out", default="data/sample")
    a = ap.parse_args()
    src, out = a.shared, a.out
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(f"{out}/mmqa")
    os.makedirs(f"{out}/spider/database")
    keep = set(DATABASES)
    for name in ["mmqa_two_table.jsonl", "mmqa_three_table.jsonl"]:
        with open(f"{src}/mmqa/{name}") as f, open(f"{out}/mmqa/{name}", "w") as g:
            for line in f:
                if json.loads(line).get("spider_db_id") in keep:
                    g.write(line)
    # The original MMQA records as published (all 21: they use two of the databases above).
    shutil.copy(f"{src}/mmqa/mmqa_two_table_original_records.json", f"{out}/mmqa/")
    for db in DATABASES:
        os.makedirs(f"{out}/spider/database/{db}")
        shutil.copy(f"{src}/spider/database/{db}/{db}.sqlite", f"{out}/spider/database/{db}/")
    tables = [t for t in json.load(open(f"{src}/spider/tables.json")) if t["db_id"] in keep]
    json.dump(tables, open(f"{out}/spider/tables.json", "w"), indent=1)
    counts = {}
    questions = []
    for q in json.load(open(f"{src}/spider/train_spider.json")):
        if q["db_id"] in keep and counts.get(q["db_id"], 0) < SPIDER_PER_DB:
            counts[q["db_id"]] = counts.get(q["db_id"], 0) + 1
            questions.append({"question": q["question"], "query": q["query"], "db_id": q["db_id"]})
    json.dump(questions, open(f"{out}/spider/train_spider.json", "w"), indent=1)
    print(f"wrote {out}: {len(DATABASES)} databases, {len(questions)} Spider questions")


if __name__ == "__main__":
    main()
