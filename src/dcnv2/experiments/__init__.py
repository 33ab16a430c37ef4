"""Experiments: the floor above the training engine and the analysis, where the paper's results are
reproduced in miniature. It owns the demo (``demo``: synthetic data, regular vs DCNv2 trained side by side,
AP table, plots and the analysis report), preset comparisons fitted to a time budget (``compare``), the
small-budget synthetic recipes (``recipes``), backbone pre-training on object crops (``pretrain``), the
Table 1/3 ablations on the pre-trained recipe (``ablation``) and the crop pre-training transfer study of
Tables 6/7 (``pretrain_study``); ``benchmarks/ablation.py`` and ``benchmarks/pretrain.py`` are thin command
lines over it. It may use every package below it (engine, analysis, export, models, data, nn, ops); only
the commands and the CLI import it. The old paths ``dcnv2.engine.demo`` / ``compare`` / ``recipes`` /
``pretrain`` / ``ablation`` still import these modules (:mod:`dcnv2._compat`).
"""
