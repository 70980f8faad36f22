"""Analysis of the unlabeled pile: embedding store, FAISS kNN, UMAP + clustering, composition, plots.

Each module imports its heavy dependency (faiss, umap, hdbscan, matplotlib, wandb) inside the functions that
need it, so importing the package stays cheap.
"""
