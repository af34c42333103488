@echo off
rem Create venv\ (unless a virtualenv/conda env is active) and install everything. Safe to re-run.
rem torch is installed only when none is importable (pinned, default 2.13.0); an existing torch is kept.
rem   CUDA build: set TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 before running.
rem   optional features (int8 base weights, TensorBoard): setup.bat --extras
setlocal
cd /d "%~dp0"
if not defined TORCH_VERSION set "TORCH_VERSION=2.13.0"
set "PY=python"
if defined VIRTUAL_ENV goto :have_env
if defined CONDA_PREFIX goto :have_env
if not exist "venv\Scripts\python.exe" (
    echo setup: creating venv\
    python -m venv venv || exit /b 1
)
set "PY=%CD%\venv\Scripts\python.exe"
:have_env
"%PY%" -c "import torch" >nul 2>&1
if errorlevel 1 (
    echo setup: installing torch==%TORCH_VERSION%
    if defined TORCH_INDEX_URL (
        "%PY%" -m pip install "torch==%TORCH_VERSION%" --index-url "%TORCH_INDEX_URL%" || exit /b 1
    ) else (
        "%PY%" -m pip install "torch==%TORCH_VERSION%" || exit /b 1
    )
) else (
    echo setup: keeping the installed torch
)
"%PY%" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > "%TEMP%\ltxv_torch_pin.txt"
"%PY%" -m pip install -r requirements.txt -c "%TEMP%\ltxv_torch_pin.txt" || exit /b 1
if /i "%~1"=="--extras" (
    "%PY%" -m pip install -r requirements-extras.txt -c "%TEMP%\ltxv_torch_pin.txt" || exit /b 1
)
"%PY%" -m pip install --no-deps -e . || exit /b 1
echo setup: done. Next: train.bat configs\quickstart.yaml
