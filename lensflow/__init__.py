"""lensflow: Glow normalizing-flow emulators of weak-lensing convergence (κ) maps.

Data flows one way: simulate or ingest -> map store (HDF5) -> DataModule -> Glow
LightningModule -> checkpoint -> generate -> map store -> statistics -> validation report.
The ground floor (``sims``, ``mapstore``, ``flows``, ``stats``) imports neither Hydra nor Lightning.
"""

__version__ = "0.1.0"
