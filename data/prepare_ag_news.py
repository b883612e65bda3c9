"""
Turn the AG News topic-classification CSVs into lookaround's JSONL format: one
{"text": "<title>. <description>", "label": "<topic>"} object per line.

    python data/prepare_ag_news.py                                  # download train.csv and test.csv (needs network)
    python data/prepare_ag_news.py --csv path/to/test.csv           # convert local CSVs, no network
    python lookaround.py --data data/ag_news/test.jsonl --objective all

The CSVs have three columns: class index (1-4), title, description; backslash-n stands for a newline.
"""

import argparse
import csv
import io
import json
import os
import sys
import urllib.request

TOPICS = ["World", "Sports", "Business", "Sci/Tech"]  # class index 1..4 (the dataset's classes.txt)
URL = "https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv/{split}.csv"


def convert(csv_text, source):
    """CSV text -> list of JSONL lines; a malformed row stops with its row number."""
    lines = []
    for n, row in enumerate(csv.reader(io.StringIO(csv_text)), 1):
        if not row:
            continue
        if len(row) != 3 or row[0].strip() not in ("1", "2", "3", "4"):
            sys.exit(f"prepare_ag_news: {source} row {n} is not 'class (1-4), title, description': {row[:3]!r}")
        title, description = (c.replace("\\n", " ").replace("\\", " ").strip() for c in row[1:])
        text = f"{title}. {description}" if title and not title.endswith((".", "?", "!")) else f"{title} {description}"
        lines.append(json.dumps({"text": " ".join(text.split()), "label": TOPICS[int(row[0]) - 1]}))
    if not lines:
        sys.exit(f"prepare_ag_news: {source} holds no rows.")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", nargs="+", help="local AG News CSV files (e.g. train.csv test.csv); default: download both")
    p.add_argument("--url", default=URL, help="download address, {split} standing for train or test")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "ag_news"),
                   help="output folder")
    args = p.parse_args(argv)
    sources = {}
    if args.csv:
        for path in args.csv:
            try:
                sources[os.path.splitext(os.path.basename(path))[0]] = open(path, encoding="utf-8").read()
            except (OSError, UnicodeDecodeError) as e:
                sys.exit(f"prepare_ag_news: cannot read {path}: {e}")
    else:
        for split in ("train", "test"):
            try:
                with urllib.request.urlopen(args.url.format(split=split), timeout=60) as r:
                    sources[split] = r.read().decode("utf-8")
            except OSError as e:
                sys.exit(f"prepare_ag_news: could not download {split}.csv ({e}). Without network, pass local copies: "
                         "--csv path/to/train.csv path/to/test.csv")
    converted = {name: convert(text, name) for name, text in sources.items()}  # check everything before writing
    os.makedirs(args.out, exist_ok=True)
    for name, lines in converted.items():
        out = os.path.join(args.out, f"{name}.jsonl")
        with open(out + ".tmp", "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(out + ".tmp", out)
        print(f"wrote {len(lines)} documents to {out}")


if __name__ == "__main__":
    main()
