"""`tierstore bench lossy` on a tiny random model and the in-memory tokenizer: the rows it
reports are what the codecs do (raw exact, lossy ones with error), and raw answers as
DynamicCache does (the bench checks it and would raise)."""

from __future__ import annotations

from support.models import tiny, tiny_tokenizer
from tierstore.tools.bench.lossy import measure


def test_lossy_bench_reports_raw_exact_and_lossy_codecs_with_error():
    model, tok = tiny(vocab_size=100), tiny_tokenizer()
    res = measure(model, tok, tokens=200, cases=2, codecs=["raw", "int8", "int4"], answer_tokens=4,
                  ppl_tokens=16, ppl_cases=1, seed=0)
    by = {s["codec"]: s for s in res["summary"]}
    assert by["raw"]["cases"] == 2 and by["raw"]["same_answer"] == 1.0
    assert by["raw"]["k_err"] == 0.0 and by["raw"]["v_err"] == 0.0 and by["raw"]["ppl_vs_raw"] == 1.0
    assert 0 < by["int8"]["k_err"] < by["int4"]["k_err"] < 0.2
    assert by["int4"]["ppl"] > 0 and len([r for r in res["rows"] if r["kind"] == "ppl"]) == 3
