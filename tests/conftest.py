import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFERKIT_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).parent))
