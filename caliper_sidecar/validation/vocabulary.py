"""Caliper 1.2 as data: event types and their actions and slot types, the entity hierarchy,
entity property kinds and the controlled vocabularies (from the IMS specification, adjusted to
its valid fixtures where the two disagree)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Final

from caliper_sidecar.envelope import CALIPER_CONTEXT

CONTEXT: Final = CALIPER_CONTEXT
ANONYMOUS_PREFIX: Final = "http://purl.imsglobal.org/caliper/"

ACTIONS: Final = frozenset(
    [
        "Abandoned",
        "Accepted",
        "Activated",
        "Added",
        "Archived",
        "Attached",
        "Bookmarked",
        "ChangedResolution",
        "ChangedSize",
        "ChangedSpeed",
        "ChangedVolume",
        "Classified",
        "ClosedPopout",
        "Commented",
        "Completed",
        "Copied",
        "Created",
        "Deactivated",
        "Declined",
        "Deleted",
        "Described",
        "DisabledClosedCaptioning",
        "Disliked",
        "Downloaded",
        "EnabledClosedCaptioning",
        "Ended",
        "EnteredFullScreen",
        "ExitedFullScreen",
        "ForwardedTo",
        "Graded",
        "Hid",
        "Highlighted",
        "Identified",
        "JumpedTo",
        "Launched",
        "Liked",
        "Linked",
        "LoggedIn",
        "LoggedOut",
        "MarkedAsRead",
        "MarkedAsUnread",
        "Modified",
        "Muted",
        "NavigatedTo",
        "OpenedPopout",
        "OptedIn",
        "OptedOut",
        "Paused",
        "Posted",
        "Printed",
        "Published",
        "Questioned",
        "Ranked",
        "Recommended",
        "Removed",
        "Reset",
        "Restarted",
        "Restored",
        "Resumed",
        "Retrieved",
        "Returned",
        "Reviewed",
        "Rewound",
        "Saved",
        "Searched",
        "Sent",
        "Shared",
        "Showed",
        "Skipped",
        "Started",
        "Submitted",
        "Subscribed",
        "Tagged",
        "TimedOut",
        "Unmuted",
        "Unpublished",
        "Unsubscribed",
        "Uploaded",
        "Used",
        "Viewed",
    ]
)

PROFILES: Final = frozenset(
    [
        "GeneralProfile",
        "AnnotationProfile",
        "AssessmentProfile",
        "AssignableProfile",
        "FeedbackProfile",
        "ForumProfile",
        "GradingProfile",
        "MediaProfile",
        "ReadingProfile",
        "ResourceManagementProfile",
        "SearchProfile",
        "SessionProfile",
        "SurveyProfile",
        "ToolLaunchProfile",
        "ToolUseProfile",
    ]
)

#: entity type -> its direct supertypes (two types have two)
PARENTS: Final[dict[str, tuple[str, ...]]] = {
    "Entity": (),
    **dict.fromkeys(
        [
            "Agent",
            "AggregateMeasure",
            "Annotation",
            "Attempt",
            "Collection",
            "Comment",
            "DigitalResource",
            "LearningObjective",
            "Link",
            "Membership",
            "Query",
            "Rating",
            "Response",
            "Result",
            "Scale",
            "Score",
            "SearchResponse",
            "Session",
        ],
        ("Entity",),
    ),
    **dict.fromkeys(["Person", "SoftwareApplication", "Organization"], ("Agent",)),
    "CourseOffering": ("Organization",),
    "CourseSection": ("CourseOffering",),
    "Group": ("Organization",),
    **dict.fromkeys(
        [
            "AssignableDigitalResource",
            "MediaObject",
            "Question",
            "Chapter",
            "Document",
            "Frame",
            "LtiLink",
            "MediaLocation",
            "Message",
            "Page",
            "WebPage",
            "QuestionnaireItem",
            "SurveyInvitation",
        ],
        ("DigitalResource",),
    ),
    "DigitalResourceCollection": ("Collection", "DigitalResource"),
    "Assessment": ("AssignableDigitalResource", "DigitalResourceCollection"),
    "AssessmentItem": ("AssignableDigitalResource",),
    **dict.fromkeys(["Forum", "Thread", "Questionnaire"], ("DigitalResourceCollection",)),
    **dict.fromkeys(["AudioObject", "ImageObject", "VideoObject"], ("MediaObject",)),
    **dict.fromkeys(
        ["DateTimeQuestion", "MultiselectQuestion", "OpenEndedQuestion", "RatingScaleQuestion"],
        ("Question",),
    ),
    **dict.fromkeys(["AggregateMeasureCollection", "Survey"], ("Collection",)),
    **dict.fromkeys(
        ["BookmarkAnnotation", "HighlightAnnotation", "SharedAnnotation", "TagAnnotation"],
        ("Annotation",),
    ),
    **dict.fromkeys(
        [
            "DateTimeResponse",
            "FillinBlankResponse",
            "MultipleChoiceResponse",
            "MultipleResponseResponse",
            "MultiselectResponse",
            "OpenEndedResponse",
            "RatingScaleResponse",
            "SelectTextResponse",
            "TrueFalseResponse",
        ],
        ("Response",),
    ),
    **dict.fromkeys(["LikertScale", "MultiselectScale", "NumericScale"], ("Scale",)),
    "LtiSession": ("Session",),
}

ENTITY_TYPES: Final = frozenset(PARENTS)


@cache
def ancestors(entity_type: str) -> frozenset[str]:
    """The type itself and every supertype, over every path."""
    found = {entity_type}
    for parent in PARENTS.get(entity_type, ()):
        found |= ancestors(parent)
    return frozenset(found)


def is_a(entity_type: str, allowed: tuple[str, ...]) -> bool:
    """True when the type is one of the allowed types or a subtype of one."""
    return not ancestors(entity_type).isdisjoint(allowed)


@dataclass(frozen=True)
class EventRule:
    """What an event type allows: its actions and the entity types of its slots."""

    actions: frozenset[str]
    actor: tuple[str, ...] = ("Person",)
    object: tuple[str, ...] = ("Entity",)
    generated: tuple[str, ...] = ("Entity",)
    target: tuple[str, ...] = ("Entity",)
    referrer: tuple[str, ...] = ("Entity",)
    #: action -> {slot: allowed types}, narrowing the slots for that action
    by_action: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)


def _actions(text: str) -> frozenset[str]:
    return frozenset(text.split())


_ATTEMPT_OR_RESPONSE: Final[dict[str, dict[str, tuple[str, ...]]]] = {
    "Started": {"generated": ("Attempt",)},
    "Skipped": {"generated": ("Attempt",)},
    "Completed": {"generated": ("Response",)},
}

EVENTS: Final[dict[str, EventRule]] = {
    "Event": EventRule(ACTIONS, actor=("Agent",)),
    "AnnotationEvent": EventRule(
        _actions("Bookmarked Highlighted Shared Tagged"),
        object=("DigitalResource",),
        generated=("Annotation",),
        target=("Frame",),
    ),
    "AssessmentEvent": EventRule(
        _actions("Started Paused Resumed Restarted Reset Submitted"),
        object=("Assessment",),
        generated=("Attempt",),
    ),
    "AssessmentItemEvent": EventRule(
        _actions("Started Skipped Completed"),
        object=("AssessmentItem",),
        generated=("Attempt", "Response"),
        referrer=("AssessmentItem",),
        by_action=_ATTEMPT_OR_RESPONSE,
    ),
    "AssignableEvent": EventRule(
        _actions("Activated Deactivated Started Completed Submitted Reviewed"),
        object=("AssignableDigitalResource",),
        generated=("Attempt",),
        target=("Frame",),
    ),
    "FeedbackEvent": EventRule(
        _actions("Commented Ranked"),
        generated=("Rating", "Comment"),
        target=("Frame",),
        by_action={"Ranked": {"generated": ("Rating",)}, "Commented": {"generated": ("Comment",)}},
    ),
    "ForumEvent": EventRule(_actions("Subscribed Unsubscribed"), object=("Forum",)),
    "GradeEvent": EventRule(
        _actions("Graded"), actor=("Agent",), object=("Attempt",), generated=("Score",)
    ),
    "MediaEvent": EventRule(
        _actions(
            """Started Ended Paused Resumed Restarted ForwardedTo JumpedTo ChangedResolution
            ChangedSize ChangedSpeed ChangedVolume EnabledClosedCaptioning
            DisabledClosedCaptioning EnteredFullScreen ExitedFullScreen Muted Unmuted
            OpenedPopout ClosedPopout"""
        ),
        object=("MediaObject",),
        target=("MediaLocation",),
    ),
    "MessageEvent": EventRule(_actions("MarkedAsRead MarkedAsUnread Posted"), object=("Message",)),
    "NavigationEvent": EventRule(
        _actions("NavigatedTo"),
        object=("DigitalResource", "SoftwareApplication"),
        target=("DigitalResource",),
        referrer=("DigitalResource", "SoftwareApplication"),
    ),
    "QuestionnaireEvent": EventRule(
        _actions("Started Submitted"), object=("Questionnaire",), generated=("Attempt",)
    ),
    "QuestionnaireItemEvent": EventRule(
        _actions("Started Skipped Completed"),
        object=("QuestionnaireItem",),
        generated=("Attempt", "Response"),
        by_action=_ATTEMPT_OR_RESPONSE,
    ),
    "ResourceManagementEvent": EventRule(
        _actions(
            """Archived Copied Created Deleted Described Downloaded Modified Printed Published
            Restored Retrieved Saved Unpublished Uploaded"""
        ),
        object=("DigitalResource",),
        generated=("DigitalResource",),
    ),
    "SearchEvent": EventRule(_actions("Searched"), generated=("SearchResponse",)),
    "SessionEvent": EventRule(
        _actions("LoggedIn LoggedOut TimedOut"),
        actor=("Person", "SoftwareApplication"),
        object=("SoftwareApplication", "Session"),
        target=("DigitalResource",),
        referrer=("DigitalResource", "SoftwareApplication"),
        by_action={
            "LoggedIn": {"actor": ("Person",), "object": ("SoftwareApplication",)},
            "LoggedOut": {"actor": ("Person",), "object": ("SoftwareApplication",)},
            "TimedOut": {"actor": ("SoftwareApplication",), "object": ("Session",)},
        },
    ),
    "SurveyEvent": EventRule(_actions("OptedIn OptedOut"), object=("Survey",)),
    "SurveyInvitationEvent": EventRule(
        _actions("Accepted Declined Sent"), object=("SurveyInvitation",)
    ),
    "ThreadEvent": EventRule(_actions("MarkedAsRead MarkedAsUnread"), object=("Thread",)),
    "ToolLaunchEvent": EventRule(
        _actions("Launched Returned"),
        object=("SoftwareApplication",),
        generated=("DigitalResource",),
        target=("Link", "LtiLink"),
    ),
    "ToolUseEvent": EventRule(
        _actions("Used"),
        object=("SoftwareApplication",),
        generated=("AggregateMeasureCollection",),
        target=("SoftwareApplication",),
    ),
    "ViewEvent": EventRule(_actions("Viewed"), object=("DigitalResource",)),
}

#: the entity-valued event properties every event type shares
COMMON_SLOTS: Final[dict[str, tuple[str, ...]]] = {
    "edApp": ("SoftwareApplication",),
    "group": ("Organization",),
    "membership": ("Membership",),
    "session": ("Session",),
    "federatedSession": ("LtiSession",),
}

EVENT_KEYS: Final = frozenset(
    [
        "@context",
        "id",
        "type",
        "profile",
        "actor",
        "action",
        "object",
        "eventTime",
        "edApp",
        "generated",
        "target",
        "referrer",
        "group",
        "membership",
        "session",
        "federatedSession",
        "extensions",
    ]
)

# Entity property kinds: "string", "datetime", "duration", "integer", "nonneg" (integer >= 0),
# "decimal", "boolean", "object", "strings" (array of strings), "identifiers", "selector",
# a vocabulary name ("metric", "status", "roles", "lti"), or an entity reference
# "Type" / "[Type]" (array of), which also takes an IRI string.
PROPERTIES: Final[dict[str, dict[str, str]]] = {
    "Entity": {
        "name": "string",
        "description": "string",
        "dateCreated": "datetime",
        "dateModified": "datetime",
        "otherIdentifiers": "identifiers",
        "extensions": "object",
    },
    "AggregateMeasure": {
        "metricValue": "decimal",
        "maxMetricValue": "decimal",
        "metric": "metric",
        "startedAtTime": "datetime",
        "endedAtTime": "datetime",
    },
    "AggregateMeasureCollection": {"items": "[AggregateMeasure]"},
    "Annotation": {"annotator": "Person", "annotated": "DigitalResource"},
    "Assessment": {"items": "[AssessmentItem]"},
    "AssessmentItem": {"isTimeDependent": "boolean"},
    "AssignableDigitalResource": {
        "dateToActivate": "datetime",
        "dateToShow": "datetime",
        "dateToStartOn": "datetime",
        "dateToSubmit": "datetime",
        "maxAttempts": "nonneg",
        "maxSubmits": "nonneg",
        "maxScore": "decimal",
    },
    "Attempt": {
        "assignee": "Person",
        "assignable": "DigitalResource",
        "count": "integer",
        "startedAtTime": "datetime",
        "endedAtTime": "datetime",
        "duration": "duration",
        "isPartOf": "Attempt",
    },
    "AudioObject": {
        "volumeLevel": "string",
        "volumeMin": "string",
        "volumeMax": "string",
        "muted": "boolean",
    },
    "BookmarkAnnotation": {"bookmarkNotes": "string"},
    "Collection": {"items": "[Entity]"},
    "Comment": {"commenter": "Person", "commentedOn": "Entity", "value": "string"},
    "CourseOffering": {"courseNumber": "string", "academicSession": "string"},
    "CourseSection": {"category": "string"},
    "DateTimeQuestion": {
        "minDateTime": "datetime",
        "minLabel": "string",
        "maxDateTime": "datetime",
        "maxLabel": "string",
    },
    "DateTimeResponse": {"dateTimeSelected": "datetime"},
    "DigitalResource": {
        "storageName": "string",
        "creators": "[Agent]",
        "mediaType": "string",
        "keywords": "strings",
        "learningObjectives": "[LearningObjective]",
        "isPartOf": "Entity",
        "datePublished": "datetime",
        "version": "string",
    },
    "DigitalResourceCollection": {"items": "[DigitalResource]"},
    "FillinBlankResponse": {"values": "strings"},
    "Forum": {"items": "[Thread]"},
    "Frame": {"index": "nonneg"},
    "HighlightAnnotation": {"selection": "selector", "selectionText": "string"},
    "LikertScale": {"scalePoints": "integer", "itemLabels": "strings", "itemValues": "strings"},
    "LtiLink": {"messageType": "lti"},
    "LtiSession": {"messageParameters": "object"},
    "MediaLocation": {"currentTime": "duration"},
    "MediaObject": {"duration": "duration"},
    "Membership": {
        "organization": "Organization",
        "member": "Person",
        "roles": "roles",
        "status": "status",
    },
    "Message": {"replyTo": "Message", "body": "string", "attachments": "[DigitalResource]"},
    "MultipleChoiceResponse": {"value": "string"},
    "MultipleResponseResponse": {"values": "strings"},
    "MultiselectQuestion": {"points": "integer", "itemLabels": "strings", "itemValues": "strings"},
    "MultiselectResponse": {"selections": "strings"},
    "MultiselectScale": {
        "scalePoints": "integer",
        "itemLabels": "strings",
        "itemValues": "strings",
        "isOrderedSelection": "boolean",
        "minSelections": "integer",
        "maxSelections": "integer",
    },
    "NumericScale": {
        "minValue": "decimal",
        "minLabel": "string",
        "maxValue": "decimal",
        "maxLabel": "string",
        "step": "decimal",
    },
    "OpenEndedResponse": {"value": "string"},
    "Organization": {"subOrganizationOf": "Organization", "members": "[Agent]"},
    "Query": {"creator": "Person", "searchTarget": "Entity", "searchTerms": "string"},
    "Question": {"questionPosed": "string"},
    "Questionnaire": {"items": "[QuestionnaireItem]"},
    "QuestionnaireItem": {"question": "Question", "categories": "strings", "weight": "decimal"},
    "Rating": {
        "rater": "Person",
        "rated": "Entity",
        "question": "Question",
        "selections": "strings",
        "ratingComment": "Comment",
    },
    "RatingScaleQuestion": {"scale": "Scale"},
    "RatingScaleResponse": {"selections": "strings"},
    "Response": {
        "attempt": "Attempt",
        "startedAtTime": "datetime",
        "endedAtTime": "datetime",
        "duration": "duration",
    },
    "Result": {
        "attempt": "Attempt",
        "maxResultScore": "decimal",
        "resultScore": "decimal",
        "scoredBy": "Agent",
        "comment": "string",
    },
    "Score": {
        "attempt": "Attempt",
        "maxScore": "decimal",
        "scoreGiven": "decimal",
        "scoredBy": "Agent",
        "comment": "string",
    },
    "SearchResponse": {
        "searchProvider": "SoftwareApplication",
        "searchTarget": "Entity",
        "query": "Query",
        "searchResultsItemCount": "nonneg",
    },
    "SelectTextResponse": {"values": "strings"},
    "Session": {
        "user": "Person",
        "client": "SoftwareApplication",
        "startedAtTime": "datetime",
        "endedAtTime": "datetime",
        "duration": "duration",
    },
    "SharedAnnotation": {"withAgents": "[Agent]"},
    "SoftwareApplication": {
        "host": "string",
        "ipAddress": "string",
        "userAgent": "string",
        "version": "string",
    },
    "Survey": {"items": "[Questionnaire]"},
    "SurveyInvitation": {
        "rater": "Person",
        "survey": "Survey",
        "sentCount": "integer",
        "dateSent": "datetime",
    },
    "TagAnnotation": {"tags": "strings"},
    "Thread": {"items": "[Message]"},
    "TrueFalseResponse": {"value": "string"},
}

REQUIRED_PROPERTIES: Final[dict[str, tuple[str, ...]]] = {
    "AggregateMeasure": ("metricValue", "metric"),
    "Questionnaire": ("items",),
}

VOCABULARIES: Final[dict[str, frozenset[str]]] = {
    "metric": frozenset(
        [
            "AssessmentsPassed",
            "AssessmentsSubmitted",
            "MinutesOnTask",
            "SkillsMastered",
            "StandardsMastered",
            "UnitsCompleted",
            "UnitsPassed",
            "WordsRead",
        ]
    ),
    "status": frozenset({"Active", "Inactive"}),
    "lti": frozenset({"LtiResourceLinkRequest", "LtiDeepLinkingRequest"}),
    "identifier_type": frozenset(
        [
            "AccountUserName",
            "CaseItemUri",
            "EmailAddress",
            "LisSourcedId",
            "LtiContextId",
            "LtiDeploymentId",
            "LtiPlatformId",
            "LtiToolId",
            "LtiUserId",
            "OneRosterSourcedId",
            "Other",
            "SisSourcedId",
            "SystemId",
        ]
    ),
    "roles": frozenset(
        [
            "Administrator",
            "ContentDeveloper",
            "Instructor",
            "Learner",
            "Manager",
            "Member",
            "Mentor",
            "Officer",
        ]
        + [
            f"Administrator#{r}"
            for r in [
                "Administrator",
                "Developer",
                "ExternalDeveloper",
                "ExternalSupport",
                "ExternalSystemAdministrator",
                "Support",
                "SystemAdministrator",
            ]
        ]
        + [
            f"ContentDeveloper#{r}"
            for r in ["ContentDeveloper", "ContentExpert", "ExternalContentExpert", "Librarian"]
        ]
        + [
            f"Instructor#{r}"
            for r in [
                "ExternalInstructor",
                "Grader",
                "GuestInstructor",
                "Instructor",
                "Lecturer",
                "PrimaryInstructor",
                "SecondaryInstructor",
                "TeachingAssistant",
                "TeachingAssistantGroup",
                "TeachingAssistantOffering",
                "TeachingAssistantSection",
                "TeachingAssistantTemplate",
            ]
        ]
        + [
            f"Learner#{r}"
            for r in ["ExternalLearner", "GuestLearner", "Learner", "NonCreditLearner"]
        ]
        + [
            f"Manager#{r}"
            for r in ["AreaManager", "CourseCoordinator", "ExternalObserver", "Manager", "Observer"]
        ]
        + ["Member#Member"]
        + [
            f"Mentor#{r}"
            for r in [
                "Advisor",
                "ExternalAdvisor",
                "ExternalAuditor",
                "ExternalLearningFacilitator",
                "ExternalMentor",
                "ExternalReviewer",
                "ExternalTutor",
                "LearningFacilitator",
                "Mentor",
                "Reviewer",
                "Tutor",
            ]
        ]
        + [f"Officer#{r}" for r in ["Chair", "Secretary", "Treasurer", "Vice-Chair"]]
    ),
}


@cache
def properties_of(entity_type: str) -> dict[str, str]:
    """Every property a type accepts, its own winning over inherited ones."""
    merged: dict[str, str] = {}
    for parent in PARENTS.get(entity_type, ()):
        merged.update(properties_of(parent))
    merged.update(PROPERTIES.get(entity_type, {}))
    return merged
