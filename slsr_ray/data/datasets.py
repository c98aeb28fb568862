"""Parsers for the public re-id datasets, following torchreid's conventions for counts and ids.

Each parser takes the dataset root (the folder that holds the dataset's own top folder, or that top
folder itself) and returns a :class:`~slsr_ray.data.base.ReidDataset`: train ids relabelled 0..N-1,
query/gallery keeping the dataset's ids, junk dropped, distractors kept in the gallery, zero-based
cameras. A query id without a gallery match is kept (the evaluator skips it).

============== ================================================== ====================================
parser         expects                                            protocol options
============== ================================================== ====================================
market1501     bounding_box_train/, query/, bounding_box_test/
dukemtmcreid   the same folders, ``0005_c2_f0046985.jpg`` names
msmt17         MSMT17_V1|V2/ with list_{train,val,query,gallery}  ``combine_val`` (default True)
viper          VIPeR/cam_a/*.bmp, VIPeR/cam_b/*.bmp               ``split_id`` 0..9, ``seed``
cuhk03         cuhk03_release/cuhk-03.mat (+ 767/700 config)      ``split_id``, ``cuhk03_labeled``,
                                                                  ``cuhk03_classic_split``
folder         see :func:`~slsr_ray.data.folder.load_folder`
============== ================================================== ====================================

Each parser lives in its own module (``market``, ``msmt17``, ``viper``, ``cuhk03``, ``folder``); this module
keeps their names importable from one place.
"""

from .cuhk03 import cuhk03_classic_split_count, load_cuhk03
from .folder import FOLDER_SPLITS, load_folder
from .market import load_dukemtmcreid, load_market1501, parse_market_style
from .msmt17 import load_msmt17
from .tree import IMAGE_EXTS
from .viper import VIPER_NUM_SPLITS, load_viper, make_viper_splits

__all__ = [
    "FOLDER_SPLITS", "IMAGE_EXTS", "VIPER_NUM_SPLITS", "cuhk03_classic_split_count", "load_cuhk03",
    "load_dukemtmcreid", "load_folder", "load_market1501", "load_msmt17", "load_viper", "make_viper_splits",
    "parse_market_style",
]
