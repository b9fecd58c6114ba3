"""Cut lorafit's builtin AG News samples from the shared 38,332-row training file.

    python scripts/make_sample.py ../shared/data/ag_news/train.parquet

Writes src/lorafit/builtin/ag_news_sample.parquet (train, stratified) and ag_news_sample_test.parquet
(a disjoint stratified held-out set). Both come from the AG News *training* split; the official test
split is never used. AG's corpus is for research and other non-commercial use.
"""

import sys
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

TRAIN_ROWS, TEST_ROWS, SEED = 12_000, 2_000, 20261128

df = pd.read_parquet(sys.argv[1])[["text", "label"]]
rest, test = train_test_split(df, test_size=TEST_ROWS, stratify=df.label, random_state=SEED)
train, _ = train_test_split(rest, train_size=TRAIN_ROWS, stratify=rest.label, random_state=SEED)
out = Path(__file__).resolve().parents[1] / "src" / "lorafit" / "builtin"
for name, part in (("ag_news_sample", train), ("ag_news_sample_test", test)):
    part = part.reset_index(drop=True).astype({"label": "int64"})
    part.to_parquet(out / f"{name}.parquet", index=False, compression="zstd")
    print(name, len(part), part.label.value_counts().sort_index().tolist())
