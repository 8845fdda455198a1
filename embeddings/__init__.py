"""Model adapters: image and text embedders on ONNX Runtime, their exporters, OCR, and micro-batching.

What the composition root uses (everything else is internal):

- :func:`embeddings.registry.build_image_embedder` -- ``sscd`` | ``sscd_distilled`` | ``effnet`` |
  ``openclip`` -> :class:`embeddings.onnx_embedder.OnnxEmbedder` (a ``service.domain.ports.ImageEmbedder``),
  exporting the model under ``models_dir`` first when it is missing or out of date;
- :func:`embeddings.registry.build_text_embedder` -> the open_clip text tower (a ``TextEmbedder``);
- :func:`embeddings.registry.build_text_reader` -> :class:`embeddings.ocr.RapidOcrReader` (a ``TextReader``);
- :class:`embeddings.batcher.MicroBatcher` -- shares model batches between concurrent requests.

Serving imports no torch: torch and open_clip are imported only inside the export functions.
"""
