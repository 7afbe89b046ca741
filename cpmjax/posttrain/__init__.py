"""Post-training (MiniCPM4 report, arXiv 2506.07900 §3): the project's verifiable instruction set
(``tasks``), supervised fine-tuning data in the MiniCPM4 chat format (``sft``) and its evaluation
(``evaluate``)."""
