"""KVSplice: a learned low-rank code of DeepSeek-V2's MLA latent, stored in the KV cache instead of it."""
from kvsplice.cache_size import KVCacheSize, get_kv_cache_size, measure_cache_bytes
from kvsplice.calibration import collect_latents, pca_splices, reconstruction_error
from kvsplice.patch import get_splices, make_splices, patch_model_with_kvsplice, unpatch_model
from kvsplice.splice import LearnedKVSplice, rank_for_ratio
from kvsplice.storage import SpliceFileMismatch, load_splices, save_splices

__all__ = [
    "KVCacheSize",
    "LearnedKVSplice",
    "SpliceFileMismatch",
    "collect_latents",
    "get_kv_cache_size",
    "get_splices",
    "load_splices",
    "make_splices",
    "measure_cache_bytes",
    "patch_model_with_kvsplice",
    "pca_splices",
    "rank_for_ratio",
    "reconstruction_error",
    "save_splices",
    "unpatch_model",
]
