"""``python -m lensexp.fit input=PATH out=fits.csv``: the Hydra entry point."""

import hydra

from lensexp.cli import clean_errors
from lensexp.config import CONF_DIR
from lensexp.fit.workflow import run

if __name__ == "__main__":
    hydra.main(config_path=str(CONF_DIR), config_name="fit", version_base="1.3")(clean_errors(run))()
