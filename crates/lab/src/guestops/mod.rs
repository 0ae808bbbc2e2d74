//! Guest operations shared by scenarios and the manual lab.
