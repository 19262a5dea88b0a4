"""evaluation.metrics: BLEU, chrF and ROUGE agree with sacrebleu and known scores, Chinese too."""

from __future__ import annotations

import pytest

from helpers import ZH_REFS


def test_text_scores_against_sacrebleu_and_known_rouge():
    import sacrebleu

    from adaptr.evaluation.metrics import rouge_l, text_scores

    hyps = ["the cat sat on the mat", "a quick brown fox", "hello"]
    refs = ["the cat is on the mat", "the quick brown fox jumps", "hello"]
    got, sigs = text_scores(hyps, refs, ["exact", "chrf", "bleu", "rougeL"])
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert got["exact"] == pytest.approx(100 / 3)
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5 of 6 and 6 words: F1 5/6
    assert rouge_l(hyps[0], refs[0]) == pytest.approx(5 / 6)
    assert rouge_l("a quick brown fox", "the quick brown fox jumps") == pytest.approx(
        2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5)
    )
    assert got["rougeL"] == pytest.approx(100 * (5 / 6 + 2 * 0.75 * 0.6 / 1.35 + 1) / 3)
    assert set(sigs) == {"chrf", "bleu"}


# ------------------------------------------------------------- BLEU tokenizers (CJK)
ZH_HYPS = ["我喜欢吃苹果", "今天天气很好", "他在北京工作了三年"]


def test_bleu_tokenizer_on_chinese_agrees_with_sacrebleu():
    import sacrebleu

    from adaptr.errors import InvalidInputError
    from adaptr.evaluation.metrics import (
        auto_bleu_tokenize,
        bleu_tokenizers,
        check_bleu_tokenize,
        text_scores,
    )

    got, sigs = text_scores(ZH_HYPS, ZH_REFS, ["bleu", "chrf"], bleu_tokenize="zh")
    want = sacrebleu.corpus_bleu(ZH_HYPS, [ZH_REFS], tokenize="zh").score
    assert got["bleu"] == pytest.approx(want) and "|tok:zh|" in sigs["bleu"]
    # 13a leaves unsegmented Chinese as one "word" per sentence: no n-gram matches at all
    plain, sigs13 = text_scores(ZH_HYPS, ZH_REFS, ["bleu"])
    assert plain["bleu"] == pytest.approx(sacrebleu.corpus_bleu(ZH_HYPS, [ZH_REFS]).score)
    assert plain["bleu"] < 1 < got["bleu"] and "|tok:13a|" in sigs13["bleu"]
    tok, why = auto_bleu_tokenize(ZH_REFS)
    assert tok == "zh" and "Chinese" in why
    assert auto_bleu_tokenize(["the cat sat", "on the mat 你"]) == ("13a", None)
    assert auto_bleu_tokenize(["これはペンです"])[0] in ("ja-mecab", "char")
    tok, why = auto_bleu_tokenize(["안녕하세요 반갑습니다"])
    assert tok in ("ko-mecab", "13a") and "mostly Korean" in why
    assert (tok == "13a") == ("needs pip install 'sacrebleu[ko]'" in why)
    assert {"13a", "intl", "zh", "char", "none"} <= set(bleu_tokenizers())
    for name in ("auto", "zh", "13a", "intl", "char", "none"):
        assert check_bleu_tokenize(name) == name
    with pytest.raises(
        InvalidInputError, match="unknown BLEU tokenizer 'jieba': choose from auto, 13a"
    ):
        check_bleu_tokenize("jieba")
    if "ja-mecab" not in bleu_tokenizers():
        with pytest.raises(InvalidInputError, match=r"needs packages .*sacrebleu\[ja\]"):
            check_bleu_tokenize("ja-mecab")
