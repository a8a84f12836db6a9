import streamlit as st

st.title("features")
