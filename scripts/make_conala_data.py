"""Build the CoNaLa curated parquet files shipped in data/conala/ (run by hand, once).

Input: the CoNaLa curated split as JSON (conala-train.json / conala-test.json, CC BY-SA 4.0,
https://conala-corpus.github.io). Output: the Hugging Face Hub parquet-conversion layout
`data/conala/curated/{train,test}/0000.parquet`, column order and types as the Hub's `neulab/conala`
curated config (question_id int64, intent, rewritten_intent, snippet strings; nulls kept).

Usage: python3 scripts/make_conala_data.py /path/to/conala-dir data/conala
"""
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("question_id", pa.int64()),
        ("intent", pa.string()),
        ("rewritten_intent", pa.string()),
        ("snippet", pa.string()),
    ]
)


def main(src: str, dst: str) -> None:
    for split in ("train", "test"):
        with open(os.path.join(src, f"conala-{split}.json"), encoding="utf-8") as f:
            rows = json.load(f)
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        out = os.path.join(dst, "curated", split)
        os.makedirs(out, exist_ok=True)
        pq.write_table(table, os.path.join(out, "0000.parquet"), compression="snappy")
        print(split, table.num_rows, "rows ->", out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
