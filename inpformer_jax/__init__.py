"""inpformer-jax: INP-Former (CVPR 2025) universal visual anomaly detection in JAX/Flax.

  from inpformer_jax import loading, anomaly_map
  loaded = loading.load("model.pth")   # an official checkpoint, a params dir or a workdir
  out = anomaly_map.maps_and_scores(loaded.model, loaded.params, images, **loaded.scoring)
"""

__version__ = "0.1.0"
