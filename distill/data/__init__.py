"""Data handling: COCO datasets and results (:mod:`distill.data.coco`) and image decoding
(:mod:`distill.data.images`)."""
