"""Ingest of FITS, HEALPix and NumPy maps; the FITS header convention; bad inputs name the file.

FITS files are written here with astropy directly (the Columbia/MassiveNuS ``ANGLE`` convention and a
plain ``CDELT`` WCS), not with lensflow's writer, so the reader is checked against the conventions
themselves. lensflow's writers are then checked to round-trip through the reader.
"""

from __future__ import annotations

import subprocess
import sys

import healpy as hp
import numpy as np
import pytest
from astropy.io import fits
from helpers.config import compose

from lensflow.fitsio import FitsMapError, fits_header, read_fits, write_fits_map, write_fits_maps, write_mock_fits
from lensflow.ingestion import IngestError, expand_inputs, ingest
from lensflow.mapstore import StoreMeta, open_store, read_maps

RNG = np.random.default_rng(0)


def _cfg(**kw):
    """conf/ingest.yaml composed as the CLI builds it, with small patches and no progress bar."""
    return compose("ingest", "healpix.npix=16", "progress=false", **kw)


def _columbia(path, kappa, angle_deg, **keys):
    """A MassiveNuS/Columbia-style file: image in the primary HDU, ANGLE = map side in degrees."""
    h = fits.Header()
    h["ANGLE"] = angle_deg
    for k, v in keys.items():
        h[k] = v
    fits.PrimaryHDU(kappa.astype(np.float32), header=h).writeto(path)


def test_columbia_angle_round_trip(tmp_path):
    maps = RNG.normal(0, 0.02, size=(5, 32, 32)).astype(np.float32)
    om = [0.25, 0.3, 0.35, 0.3, 0.3]
    for i in range(5):
        _columbia(tmp_path / f"WLconv_{i:03d}.fits", maps[i], 3.5, H0=70.0, OM=om[i], SI8=0.8, Z=1.0)
    out = ingest(_cfg(input=str(tmp_path), out=str(tmp_path / "s.h5")))
    st = open_store(out)
    assert st.n == 5 and st.channels == 1 and st.npix == 32
    assert st.meta.pixel_arcmin == pytest.approx(3.5 * 60 / 32)
    assert st.meta.source_redshifts == (1.0,)
    assert st.meta.param_names == ("Omega_m", "h", "sigma_8")
    np.testing.assert_array_equal(st.read()[:, 0], maps)
    np.testing.assert_allclose(st.read_params(), np.c_[om, [0.7] * 5, [0.8] * 5], rtol=1e-6)
    assert len(set(st.read_realization().tolist())) == 5


def test_cdelt_and_cd_wcs_and_glob(tmp_path):
    maps = RNG.normal(size=(3, 24, 24)).astype(np.float32)
    for i, m in enumerate(maps):
        h = fits.Header()
        h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
        if i < 2:
            h["CDELT1"], h["CDELT2"] = -0.5 / 60, 0.5 / 60
        else:
            h["CUNIT1"], h["CUNIT2"] = "arcmin", "arcmin"
            h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = -0.5, 0.0, 0.0, 0.5
        fits.PrimaryHDU(m, header=h).writeto(tmp_path / f"map{i}.fits")
    (tmp_path / "notes.txt").write_text("not a map")
    out = ingest(_cfg(input=str(tmp_path / "map*.fits"), out=str(tmp_path / "s.h5")))
    st = open_store(out)
    assert st.meta.pixel_arcmin == pytest.approx(0.5)
    assert st.meta.param_names == ()
    assert np.isnan(st.meta.source_redshifts[0])
    np.testing.assert_array_equal(st.read()[:, 0], maps)


def test_lensflow_fits_writers_round_trip(tmp_path):
    maps = RNG.normal(size=(4, 2, 16, 16)).astype(np.float32)
    params = np.array([[0.3, 0.8], [0.31, 0.81], [0.32, 0.82], [0.33, 0.83]])
    paths = write_fits_maps(
        tmp_path / "f", maps, 2.0, z_source=[0.5, 1.0], params=params, param_names=("Omega_m", "sigma_8")
    )
    assert [p.name for p in paths] == [f"kappa_{i:06d}.fits" for i in range(4)]
    fm = read_fits(paths[2])
    assert fm.kappa.shape == (1, 2, 16, 16) and fm.pixel_arcmin == pytest.approx(2.0)
    assert fm.z_source == [0.5, 1.0] and fm.params == {"Omega_m": [0.32], "sigma_8": [0.82]}
    hdr = fits_header(16, 2.0, center_deg=(30.0, -20.0))
    assert hdr["ANGLE"] == pytest.approx(32 / 60) and hdr["CDELT1"] == pytest.approx(-2 / 60)
    out = ingest(_cfg(input=str(tmp_path / "f"), out=str(tmp_path / "s.h5")))
    k, p = read_maps(out, with_params=True)
    np.testing.assert_array_equal(k, maps)
    np.testing.assert_allclose(p, params, rtol=1e-6)
    assert open_store(out).meta.source_redshifts == (0.5, 1.0)
    # mock writers (generation): a folder of files and one cube, both read back by ingest
    meta = StoreMeta(pixel_arcmin=2.0, source_redshifts=(0.5, 1.0), kind="mock", param_names=("Omega_m", "sigma_8"))
    batches = [(maps[:3], params[:3], np.arange(3)), (maps[3:], params[3:], np.array([3]))]
    write_mock_fits(tmp_path / "mock_files", iter(batches), meta, layout="files")
    assert sorted(p.name for p in (tmp_path / "mock_files").iterdir()) == [f"map-{i:09d}.fits" for i in range(4)]
    write_mock_fits(tmp_path / "mock.fits", iter(batches), meta, layout="cube", n_total=4)
    for src, name in [(tmp_path / "mock_files", "a.h5"), (tmp_path / "mock.fits", "b.h5")]:
        k, p = read_maps(ingest(_cfg(input=str(src), out=str(tmp_path / name), kind="mock")), with_params=True)
        np.testing.assert_array_equal(k, maps)
        np.testing.assert_allclose(p, params, rtol=1e-6)
    with pytest.raises(FileExistsError):
        write_mock_fits(tmp_path / "mock.fits", iter(batches), meta, layout="cube", n_total=4)


def test_npy_and_npz(tmp_path):
    a = RNG.normal(size=(6, 20, 20)).astype(np.float32)
    np.save(tmp_path / "a.npy", a[:4])
    np.save(tmp_path / "b.npy", a[4:])
    out = ingest(
        _cfg(
            input=[str(tmp_path / "a.npy"), str(tmp_path / "b.npy")],
            pixel_arcmin=1.0,
            z_source=[1.5],
            params={"Omega_m": 0.3},
            out=str(tmp_path / "s.h5"),
        )
    )
    k, p = read_maps(out, with_params=True)
    np.testing.assert_array_equal(k[:, 0], a)
    np.testing.assert_allclose(p[:, 0], 0.3, rtol=1e-6)
    assert open_store(out).meta.source_redshifts == (1.5,)
    np.savez(tmp_path / "c.npz", kappa=a[:, None], params=np.c_[np.arange(6.0)], param_names=np.array(["sigma_8"]))
    out = ingest(_cfg(input=str(tmp_path / "c.npz"), pixel_arcmin=1.0, out=str(tmp_path / "t.h5")))
    k, p = read_maps(out, with_params=True)
    np.testing.assert_array_equal(k[:, 0], a)
    np.testing.assert_array_equal(p[:, 0], np.arange(6.0))


def test_healpix_fits_and_npy(tmp_path):
    nside = 128
    maps = [hp.synfast(1e-4 / (np.arange(3 * nside) + 10.0), nside) for _ in range(2)]
    for i, m in enumerate(maps):
        hp.write_map(str(tmp_path / f"sky{i}.fits"), m, dtype=np.float64)
    out = ingest(
        _cfg(
            input=str(tmp_path / "sky*.fits"),
            pixel_arcmin=60.0,
            out=str(tmp_path / "s.h5"),
            healpix={
                "npix": 16,
                "field": 0,
                "nest": False,
                "interpolation": "nearest",
                "max_patches": 7,
                "lon_offset_deg": 0.0,
            },
        )
    )
    st = open_store(out)
    assert st.n == 14 and st.npix == 16 and st.meta.pixel_arcmin == 60.0
    rid = st.read_realization()
    np.testing.assert_array_equal(rid, [0] * 7 + [1] * 7)
    assert len(set(st.split[:7].tolist())) == 1 and len(set(st.split[7:].tolist())) == 1  # never straddle splits
    from lensflow.sims.fullsky import cut_patches

    ref = cut_patches(maps[1].astype(np.float32).astype(np.float64), 16, 60.0, interpolation="nearest", max_patches=7)
    np.testing.assert_allclose(st.read(np.arange(7, 14))[:, 0], ref.maps, rtol=1e-6)
    np.save(tmp_path / "sky.npy", np.stack(maps))  # [C, Npix]: two channels of one sky
    out = ingest(
        _cfg(input=str(tmp_path / "sky.npy"), pixel_arcmin=60.0, z_source=[0.5, 1.0], out=str(tmp_path / "t.h5"))
    )
    st = open_store(out)
    assert st.channels == 2 and set(st.read_realization().tolist()) == {0}


def _bad_file(tmp_path, case):
    good = RNG.normal(size=(16, 16)).astype(np.float32)
    _columbia(tmp_path / "a.fits", good, 1.0)
    if case == "no pixel scale":
        fits.PrimaryHDU(good).writeto(tmp_path / "b.fits")
        return "b.fits", "no pixel scale"
    if case == "shape":
        _columbia(tmp_path / "b.fits", np.zeros((8, 8), np.float32), 1.0)
        return "b.fits", "shape"
    if case == "nan":
        bad = good.copy()
        bad[3, 3] = np.nan
        _columbia(tmp_path / "b.fits", bad, 1.0)
        return "b.fits", "NaN"
    if case == "unreadable":
        (tmp_path / "b.fits").write_bytes(b"SIMPLE  = this is not a FITS file" * 10)
        return "b.fits", "not a readable FITS"
    if case == "pixel scale differs":
        _columbia(tmp_path / "b.fits", good, 2.0)
        return "b.fits", "pixel scale"
    if case == "params differ":
        _columbia(tmp_path / "b.fits", good, 1.0, OM=0.3)
        return "b.fits", "parameters"
    if case == "non-square":
        _columbia(tmp_path / "b.fits", np.zeros((16, 12), np.float32), 1.0)
        return "b.fits", "not square"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["no pixel scale", "shape", "nan", "unreadable", "pixel scale differs", "params differ", "non-square"]
)
def test_bad_inputs_name_the_file_and_write_nothing(tmp_path, case):
    name, match = _bad_file(tmp_path, case)
    out = tmp_path / "out" / "s.h5"
    with pytest.raises(ValueError, match=match) as err:
        ingest(_cfg(input=str(tmp_path / "*.fits"), out=str(out)))
    assert name in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_other_bad_inputs(tmp_path):
    with pytest.raises(IngestError, match="no files match"):
        expand_inputs(str(tmp_path / "*.fits"))
    with pytest.raises(IngestError, match="nope.fits: file not found"):
        expand_inputs(str(tmp_path / "nope.fits"))
    np.save(tmp_path / "a.npy", np.zeros((2, 8, 8), np.float32))
    with pytest.raises(IngestError, match="a.npy: no pixel scale"):
        ingest(_cfg(input=str(tmp_path / "a.npy"), out=str(tmp_path / "s.h5")))
    with pytest.raises(IngestError, match="pixel_arcmin"):
        hp.write_map(str(tmp_path / "sky.fits"), np.zeros(hp.nside2npix(8)))
        ingest(_cfg(input=str(tmp_path / "sky.fits"), out=str(tmp_path / "s.h5")))
    _columbia(tmp_path / "x.fits", np.zeros((8, 8), np.float32), 1.0)
    with pytest.raises(IngestError, match="ingest one kind at a time"):
        ingest(
            _cfg(
                input=[str(tmp_path / "x.fits"), str(tmp_path / "a.npy")], pixel_arcmin=7.5, out=str(tmp_path / "s.h5")
            )
        )
    assert not (tmp_path / "s.h5").exists()
    with pytest.raises(FitsMapError, match="y.fits: no image HDU"):
        fits.HDUList(
            [fits.PrimaryHDU(), fits.BinTableHDU.from_columns([fits.Column(name="a", format="D", array=np.zeros(3))])]
        ).writeto(tmp_path / "y.fits")
        read_fits(tmp_path / "y.fits")
    with pytest.raises(ValueError, match="NaN"):
        write_fits_map(tmp_path / "z.fits", np.full((4, 4), np.nan), 1.0)
    assert not (tmp_path / "z.fits").exists()


def test_cli_reports_one_line_errors(tmp_path):
    _columbia(tmp_path / "a.fits", np.zeros((8, 8), np.float32), 1.0)
    fits.PrimaryHDU(np.zeros((8, 8), np.float32)).writeto(tmp_path / "b.fits")
    r = subprocess.run(
        [sys.executable, "-m", "lensflow.ingest", f"input={tmp_path}", f"out={tmp_path / 's.h5'}", "progress=false"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "b.fits" in lines[0]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lensflow.ingest",
            f"input={tmp_path / 'a.fits'}",
            f"out={tmp_path / 's.h5'}",
            "progress=false",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert open_store(tmp_path / "s.h5").n == 1


def test_fits_outputs_respect_the_umask(tmp_path):
    """Mode 0644 files (and a 0755 folder) under umask 022: collaborators can read them."""
    import os

    meta = StoreMeta(pixel_arcmin=2.0, source_redshifts=(1.0,), kind="mock")
    batches = [(np.zeros((2, 1, 8, 8), np.float32), None, None)]
    old = os.umask(0o022)
    try:
        one = write_fits_map(tmp_path / "one.fits", np.zeros((8, 8)), 1.0)
        cube = write_mock_fits(tmp_path / "cube.fits", batches, meta, layout="cube", n_total=2)
        folder = write_mock_fits(tmp_path / "maps", batches, meta, layout="files")
        many = write_fits_maps(tmp_path / "many", np.zeros((2, 8, 8)), 1.0)
        store = ingest(_cfg(input=str(cube), out=str(tmp_path / "s.h5")))
    finally:
        os.umask(old)
    for p in (one, cube, *folder.iterdir(), *many, store):
        assert (p.stat().st_mode & 0o777) == 0o644, p
    assert (folder.stat().st_mode & 0o777) == 0o755


def test_the_command_line_composes_the_library_defaults():
    """A partial mapping from Python and the command line are completed from one table,
    ``ingestion.request.DEFAULTS`` (``conf/ingest.yaml`` takes it as a node): same values, same order, same
    provenance text."""
    from helpers.config import plain

    from lensflow.ingestion.request import DEFAULTS

    composed = plain("ingest")
    assert DEFAULTS == composed and list(DEFAULTS) == list(composed)
