"""Reports: figures (:mod:`.figures`), HTML pages (:mod:`.html`), notebook execution (:mod:`.notebook`)
and console text (:mod:`.text`).

Every function here takes plain data (arrays, summary dicts, paths) and draws or formats it; nothing
here imports the training, generation, validation or pipeline packages, which call in.
"""
