@echo off
rem Usage: convert.bat FILE.safetensors^|RUN_DIR [--to-comfy^|--to-diffusers] [-o OUT] [--save-dtype bf16]
rem The standalone converter (python -m ltxv_tuner.convert) with the project's venv\; nothing needs activating.
setlocal
set "HERE=%~dp0"
set "PYTHONPATH=%HERE%src;%PYTHONPATH%"
set "PY=python"
if not defined VIRTUAL_ENV if not defined CONDA_PREFIX if exist "%HERE%venv\Scripts\python.exe" set "PY=%HERE%venv\Scripts\python.exe"
"%PY%" -c "import sys; from ltxv_tuner.bootstrap import missing_modules; sys.exit(1 if missing_modules() else 0)" >nul 2>&1
if errorlevel 1 (
    echo error: %PY% lacks the packages of ltxv-tuner: run setup.bat once ^(it creates venv\^), then convert.bat again 1>&2
    exit /b 2
)
"%PY%" -m ltxv_tuner.convert %*
exit /b %ERRORLEVEL%
