"""Reports: figures (:mod:`~lensflow.report.figures`), HTML pages (:mod:`~lensflow.report.html`), notebook
execution (:mod:`~lensflow.report.notebook`) and console text (:mod:`~lensflow.report.text`).

Every function here takes plain data (arrays, summary dicts, paths) and draws or formats it; nothing
here imports the training, generation, validation or pipeline packages, which call in.
"""
