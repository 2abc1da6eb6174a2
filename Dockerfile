# wattplan image: Airflow 3.3 (api-server, scheduler, dag-processor), the wattplan CLI and the
# reference cluster agent. Used by every non-database service in docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AIRFLOW_HOME=/opt/airflow \
    WATTPLAN_STATE_DIR=/var/lib/wattplan

# Non-root runtime user, Airflow's convention: uid 50000, group 0.
RUN useradd --uid 50000 --gid 0 --home-dir /opt/airflow --no-create-home --shell /bin/bash airflow \
    && mkdir -p /opt/airflow/logs /var/lib/wattplan /var/lib/wattplan-agent \
    && chown -R airflow:0 /opt/airflow /var/lib/wattplan /var/lib/wattplan-agent

# wattplan.settings.PROJECT_ROOT is the folder above the wattplan package, and sql/, data/,
# dags/ and plugins/ are found relative to it: the project is installed editable from here.
WORKDIR /opt/wattplan

# Dependencies first (their own layer, rebuilt only when the pins or the dependency list change).
COPY pyproject.toml constraints.txt README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY wattplan/ wattplan/
COPY telemetry/ telemetry/
COPY forecasting/ forecasting/
COPY optimizer/ optimizer/
COPY profiles/ profiles/
COPY agent/ agent/
COPY simulator/ simulator/
COPY sql/ sql/
COPY data/ data/
COPY dags/ dags/
COPY plugins/ plugins/
RUN pip install --no-deps -c constraints.txt -e . \
    && pip check

ENV AIRFLOW__CORE__DAGS_FOLDER=/opt/wattplan/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/wattplan/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False

USER airflow
EXPOSE 8080 8765
CMD ["wattplan", "--help"]
