@echo off
rem Usage: train.bat CONFIG.yaml [key=value ...] [--only preprocess^|train^|convert] [--resume RUN_DIR^|latest]
rem Runs train.py with the project's venv\ (made by setup.bat); nothing needs activating.
rem Overrides with brackets or spaces go in double quotes: train.bat configs\my.yaml "lora.target_modules=[to_q,to_k]"
setlocal
set "HERE=%~dp0"
if "%~1"=="" (
    echo usage: train.bat CONFIG.yaml [key=value ...] [--only preprocess^|train^|convert] [--resume RUN_DIR^|latest]
    echo   e.g. train.bat configs\quickstart.yaml
    echo   run setup.bat first; train.bat --help lists every option
    exit /b 2
)
set "PY=python"
if not defined VIRTUAL_ENV if not defined CONDA_PREFIX if exist "%HERE%venv\Scripts\python.exe" set "PY=%HERE%venv\Scripts\python.exe"
rem train.py itself falls back to venv\ (or says to run setup.bat) when this python lacks the packages.
"%PY%" "%HERE%train.py" %*
exit /b %ERRORLEVEL%
