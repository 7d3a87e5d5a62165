"""Retrieval: from a model to ranked galleries.

- ``encoding``: images through the model to codes ``(N, M)`` and query tables ``(Q, M, K)``;
  ``inference.encode_images`` does it for paths or PIL images;
- ``scoring``: ``score(tables, codes)``, the asymmetric score itself;
- ``adc``, ``topk``, ``blocks``: the ranking engine (evaluation, top-k search, the shared
  blocking), ``evaluate_adc`` (mAP, P@k, PR) and ``search_adc`` (top-k);
- ``metrics``: AP, precision, recall and PR points on a user's own scores;
- ``faiss_index``, ``ivf_index``, ``export``: the codes as faiss flat or IVF indexes;
- ``gallery_index``, ``shards``: gallery indexes that are reused and encoded in shards by
  several processes;
- ``milvus_gallery``: a gallery in Milvus (Lite or a server), searched with exact scores.
"""
from .adc import evaluate_adc, search_adc
from .scoring import score
from .encoding import encode_gallery, encode_queries, evaluate_model, extract_features
from .faiss_index import build_head_index, load_faiss_index, save_faiss_index, search_head_queries
from .inference import encode_images
from .ivf_index import add_to_ivf, build_ivf_index, train_ivf
from .metrics import average_precision, precision_at_k, recall_at_k, retrieval_metrics

__all__ = ["score", "evaluate_adc", "search_adc", "encode_gallery", "encode_queries", "evaluate_model",
           "extract_features", "encode_images", "build_head_index", "search_head_queries",
           "save_faiss_index", "load_faiss_index", "build_ivf_index", "train_ivf",
           "add_to_ivf", "average_precision", "precision_at_k", "recall_at_k",
           "retrieval_metrics"]
