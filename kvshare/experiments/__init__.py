"""The logic behind the notebooks: thin notebook cells call these functions, one module per notebook.

    common          what several notebooks use: paths, settings, held-out perplexity, searches, generations
    observation     notebooks/01_observation.ipynb
    search          notebooks/02_search.ipynb
    evaluation      notebooks/03_evaluation.ipynb
    memory_speed    notebooks/04_memory_speed.ipynb
    intra_layer     notebooks/05_intra_layer.ipynb
    quantized       notebooks/06_quantized.ipynb
    ablations       notebooks/08_ablations.ipynb
    reports/        each notebook's figures and report text, under the same name (only reports import matplotlib)

This package sits on top of the core: it imports `kvshare.*`, and no core module imports it.
"""
