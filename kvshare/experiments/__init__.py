"""The logic behind the notebooks: thin notebook cells call these functions, one module per notebook.

    scaffold        what every notebook's module shares: settings with a quick mode (`RunSettings`), the
                    resumable results cache (`ResultCache`), saving a run's settings and rows
    common          what several notebooks use: paths, the searches' settings, held-out perplexity, searches,
                    generations
    observation     notebooks/01_observation.ipynb
    search          notebooks/02_search.ipynb
    evaluation      notebooks/03_evaluation.ipynb
    memory_speed    notebooks/04_memory_speed.ipynb
    intra_layer     notebooks/05_intra_layer.ipynb
    quantized       notebooks/06_quantized.ipynb
    peers           notebooks/07_peers.ipynb
    ablations       notebooks/08_ablations.ipynb (search_cost: its search-cost section)
    long_context    notebooks/09_long_context.ipynb
    best_search     notebooks/11_best_search.ipynb
    budget          the time budget of notebooks 01-03 per model
    reports/        each notebook's figures and report text, under the same name (only reports import matplotlib)

This package sits on top of the core: it imports `kvshare.*`, and no core module imports it
(tests/test_architecture.py checks both).
"""
