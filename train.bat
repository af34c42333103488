@echo off
rem Usage: train.bat CONFIG.yaml [key=value ...] [--only preprocess^|train^|convert] [--resume latest]
setlocal
set "HERE=%~dp0"
if "%~1"=="" (
    echo usage: train.bat CONFIG.yaml [key=value ...] [--only preprocess^|train^|convert] [--resume RUN_DIR^|latest]
    echo   e.g. train.bat configs\quickstart.yaml
    echo   run setup.bat first; python train.py --help lists every option
    exit /b 2
)
if not defined VIRTUAL_ENV if exist "%HERE%venv\Scripts\activate.bat" call "%HERE%venv\Scripts\activate.bat"
python "%HERE%train.py" %*
exit /b %ERRORLEVEL%
