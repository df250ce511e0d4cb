"""The federated Query/Retrieve SCP: one DICOM query fanned out to every member site.

settings  the `federation` section of conf/engine.yaml and its cross-checks
levels    query models, levels, their unique keys and which level owns an attribute
matching  PS3.4 C.2.2.2 attribute matching, re-applied to every site's answer
request   reading a caller's identifier into a validated request
merging   one row per entity, rewritten to local identifiers and one character set
sitefind  blocking C-FIND against one site, streamed, cancellable, level by level
fanout    the reactor side of a federated C-FIND: identities, timeouts, merging
locations which sites hold which study, remembered from queries
retrieve  C-MOVE/C-GET: locate, pull through the stamping pipeline, count
transfer  sending the pulled objects on, with sub-operation counts and final status
qrscp     the pynetdicom side: handlers, the C-MOVE/C-GET service class
wiring    building it all from the configuration
"""
