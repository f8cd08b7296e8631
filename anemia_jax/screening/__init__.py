"""The clinical screening product: colour features, the screening model (Hgb estimate, anemia call), clinical
statistics, the per-photo quality verdict and report, and the local page. Never imports training."""
