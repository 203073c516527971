"""Evaluation metrics of the paper's protocols: VQA/OK-VQA/GQA accuracy, caption metrics,
retrieval Recall@K with ITC top-k + ITM re-ranking."""
from blip2_jax.evaluators.metrics.caption import (
    SpiceUnavailableError,
    caption_scores,
    ptb_tokenize,
    spice_available,
    spice_missing_files,
)
from blip2_jax.evaluators.metrics.lemmatize import lemmatize_answer
from blip2_jax.evaluators.metrics.retrieval import (
    best_positive_rank,
    rerank_topk,
    retrieval_recall,
)
from blip2_jax.evaluators.metrics.vqa import (
    gqa_accuracy,
    gqa_score,
    normalize_answer,
    okvqa_score,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
    vqa_score,
)

__all__ = [
    "SpiceUnavailableError", "best_positive_rank", "caption_scores", "gqa_accuracy", "gqa_score",
    "lemmatize_answer", "normalize_answer", "okvqa_score", "process_digit_article",
    "process_punctuation", "ptb_tokenize", "rerank_topk", "retrieval_recall", "spice_available",
    "spice_missing_files", "vqa_accuracy", "vqa_score",
]
