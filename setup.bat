@echo off
rem Create venv\ (unless a virtualenv/conda env is active) and install everything. Safe to re-run.
rem torch is installed only when none is importable (pinned, default 2.13.0); an existing torch is kept.
rem   CUDA build:    set TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128   then run setup.bat
rem   system torch:  set USE_SYSTEM_SITE_PACKAGES=1   (venv\ sees the torch of your system python)
rem   other python:  set PYTHON=py -3.12
rem   optional features (int8 base weights, TensorBoard): setup.bat --extras
rem This file needs CRLF line endings (.gitattributes): cmd.exe misreads labels in LF files.
setlocal
set "EXTRAS=0"
:parse
if "%~1"=="" goto :parsed
if /i "%~1"=="--extras" (
    set "EXTRAS=1"
    shift
    goto :parse
)
if /i "%~1"=="--help" goto :usage
if /i "%~1"=="-h" goto :usage
echo setup: unknown option %~1 1>&2
call :usage 1>&2
exit /b 2
:usage
echo usage: setup.bat [--extras]   (env: TORCH_VERSION, TORCH_INDEX_URL, USE_SYSTEM_SITE_PACKAGES=1, PYTHON)
exit /b 0

:parsed
cd /d "%~dp0"
if not defined TORCH_VERSION set "TORCH_VERSION=2.13.0"
if not defined PYTHON set "PYTHON=python"
set "PY=python"
if defined VIRTUAL_ENV goto :have_env
if defined CONDA_PREFIX goto :have_env
set "VENV_FLAGS="
if "%USE_SYSTEM_SITE_PACKAGES%"=="1" set "VENV_FLAGS=--system-site-packages"
if not exist "venv\Scripts\python.exe" (
    echo setup: creating venv\ with %PYTHON%
    %PYTHON% -m venv %VENV_FLAGS% venv || exit /b 1
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
rem Pin whatever torch is there now so no dependency can swap it for another build.
"%PY%" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > "%TEMP%\ltxv_torch_pin.txt"
"%PY%" -m pip install -r requirements.txt -c "%TEMP%\ltxv_torch_pin.txt" || exit /b 1
if "%EXTRAS%"=="1" (
    "%PY%" -m pip install -r requirements-extras.txt -c "%TEMP%\ltxv_torch_pin.txt" || exit /b 1
)
"%PY%" -m pip install --no-deps -e . || exit /b 1
rem The default torch wheel on Windows is CPU-only: say which one this is.
"%PY%" -c "import torch; print('setup: torch', torch.__version__, '- GPU:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none, CPU only (fine for the quickstart; for GPU training: python -m pip uninstall -y torch, set TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128, run setup.bat again)')"
echo setup: done. Next: train.bat configs\quickstart.yaml
