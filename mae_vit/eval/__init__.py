"""Evaluation of classifiers and frozen features: top-k accuracy, weighted kNN, few-shot linear regression."""

from mae_vit.eval.features import extract_features
from mae_vit.eval.fewshot import fewshot_linear
from mae_vit.eval.knn import knn_accuracy, knn_classify
from mae_vit.eval.metrics import ClassificationMeter, classifier_metrics, topk_correct

__all__ = [
    "ClassificationMeter",
    "classifier_metrics",
    "extract_features",
    "fewshot_linear",
    "knn_accuracy",
    "knn_classify",
    "topk_correct",
]
