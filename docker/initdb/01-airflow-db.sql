-- Runs once, when the postgres container initialises an empty data volume, as POSTGRES_USER.
-- POSTGRES_DB (wattplan) already exists; Airflow keeps its metadata in a database of its own.
CREATE DATABASE airflow;
